// d3 v7 plus the d3-jetpack pieces circuit-tracer's viewer calls, as one global `d3` over one copy of
// d3-selection (jetpack's own index also pulls attachTooltip, which needs d3 v5's d3.event)
import * as d3 from "d3";
import append from "./node_modules/d3-jetpack/src/append.js";
import appendMany from "./node_modules/d3-jetpack/src/appendMany.js";
import at from "./node_modules/d3-jetpack/src/at.js";
import clamp from "./node_modules/d3-jetpack/src/clamp.js";
import conventions from "./node_modules/d3-jetpack/src/conventions.js";
import drawAxis from "./node_modules/d3-jetpack/src/drawAxis.js";
import insert from "./node_modules/d3-jetpack/src/insert.js";
import nestBy from "./node_modules/d3-jetpack/src/nestBy.js";
import parent from "./node_modules/d3-jetpack/src/parent.js";
import selectAppend from "./node_modules/d3-jetpack/src/selectAppend.js";
import st from "./node_modules/d3-jetpack/src/st.js";
import translate from "./node_modules/d3-jetpack/src/translate-selection.js";
import tspans from "./node_modules/d3-jetpack/src/tspans.js";

Object.assign(d3.selection.prototype, {append, appendMany, at, insert, parent, selectAppend, st, translate, tspans,
                                       prop: d3.selection.prototype.property});
Object.assign(d3.transition.prototype, {at, st, translate});
// the viewer calls c.drawAxis(svg) on a conventions object (newer jetpacks attach it; 2.3.0 exports it apart)
function conventionsWithAxes(options) {
  const c = conventions(options);
  c.drawAxis = svg => drawAxis(Object.assign({}, c, {svg: svg || c.svg}));
  return c;
}
window.d3 = Object.assign({}, d3, {clamp, conventions: conventionsWithAxes, nestBy});
