"""The whole pipeline on the built-in synthetic corpus at a tiny size, on the CPU (`make demo`).

The stages run in order as they exist; today: data preparation (corpus → tokenizer → shards → batches).
"""
from __future__ import annotations

import json

from data.loader import ShardLoader
from data.prepare import PrepareConfig, prepare_dataset


def show_data(prepared) -> None:
    folder, tok, meta = prepared
    concepts = {c["id"]: c for c in json.loads((folder / meta["concepts"]).read_text())}
    batch = ShardLoader(folder, "train", seq_len=48, batch_size=1, seed=0).batch(0)
    print("\none training window (48 tokens), concept-labelled tokens in [brackets]:")
    parts = []
    for tid, lab in zip(batch.tokens[0].tolist(), batch.labels[0].tolist()):
        piece = tok.decode([tid]).replace(tok.decode([tok.bos_id]), "<BOS>")
        lead = piece[:len(piece) - len(piece.lstrip())]
        parts.append(f"{lead}[{piece.strip()}:{concepts[lab]['category']}]" if lab else piece)
    print("  " + "".join(parts))
    facts = [json.loads(line) for line in (folder / meta["facts"]).read_text().splitlines()]
    print(f"\n{len(facts)} fact prompts for completion tests, for example:")
    for f in (facts[0], facts[1], next(f for f in facts if f["phrasing"] == "heldout")):
        print(f"  [{f['phrasing']}] {f['prompt']!r} -> {f['answer']!r} (chance 1/{len(f['candidates'])})")


def main() -> None:
    prepared = prepare_dataset(PrepareConfig(dataset="synthetic", synthetic_mb=4.0))
    show_data(prepared)


if __name__ == "__main__":
    main()
