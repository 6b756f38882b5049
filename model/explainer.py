"""The explainer/judge LLM: any seq2seq (T5 family) or causal LM that `transformers` can load.

Loaded with `from_pretrained` from the hub or a local folder (remote code only when asked); bf16 on
a GPU with native bf16 (Flan-T5 in fp16 overflows and writes garbage), fp32 elsewhere, every CPU
included. Two operations, both batched: `generate` (greedy, deterministic; or seeded sampling for a
retry) and `yes_probability` (one forward step: P("yes") / (P("yes") + P("no")) for the next token, no
free text). Causal models see their chat template when they have one.

A prompt's budget leaves room for the answer (`prompt_budget`): a causal model's prompt and generated
tokens share one context (prompt + max_new_tokens ≤ its positions, 4,096 at most for the prompt); a
seq2seq model's prompt has the encoder's 512 to itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from core.files import UserError
from model.precision import describe, native_bf16

DType = Literal["auto", "bfloat16", "float32", "float16"]  # --dtype


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU with native bf16, fp32 elsewhere (on every CPU, as the stages' autocast does).
    An explicit bf16 where the hardware would emulate it is honoured, with a warning."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and native_bf16(device) else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype {dtype!r}: use auto, bfloat16, float32 or float16")
    if table[dtype] == torch.bfloat16 and not native_bf16(device):
        print(f"warning: --dtype {dtype}: {describe(device)}; bf16 is emulated here and far slower than float32")
    return table[dtype]


def answer_ids(tok, words: tuple[str, ...]) -> set[int]:
    """The first token of each word, alone and after a space; a leading token that is only whitespace
    (a sentencepiece "▁" on its own) is skipped, since " yes" and " no" would share it."""
    ids = set()
    for w in words:
        for variant in (w, " " + w):
            pieces = tok(variant, add_special_tokens=False).input_ids
            while len(pieces) > 1 and not tok.decode(pieces[:1]).strip():
                pieces = pieces[1:]
            if pieces:
                ids.add(pieces[0])
    return ids


def digit_ids(tok, name: str) -> list[list[int]]:
    """Per digit 0–9, the token ids read as that digit; ten disjoint, non-empty sets."""
    sets = [answer_ids(tok, (str(d),)) for d in range(10)]
    clash = any(a & b for i, a in enumerate(sets) for b in sets[i + 1:])
    if not all(sets) or clash:
        raise UserError(f"the judge {name}'s tokenizer does not have one first token per digit 0–9; the "
                        "simulation scorer needs it (choose another judge or drop simulation from --scorers)")
    return [sorted(s) for s in sets]


def yes_no_ids(tok, name: str) -> tuple[list[int], list[int]]:
    """The token ids read as "yes" and as "no"; they must be two disjoint, non-empty sets."""
    yes, no = answer_ids(tok, ("yes", "Yes")), answer_ids(tok, ("no", "No"))
    if not yes or not no or yes & no:
        shared = ", ".join(repr(tok.decode([i])) for i in sorted(yes & no)) or "none"
        raise UserError(f"the judge {name}'s tokenizer does not tell yes from no by the first answer token "
                        f"(yes ids {sorted(yes)}, no ids {sorted(no)}, shared: {shared}); choose another judge")
    return sorted(yes), sorted(no)


class Explainer:
    def __init__(self, name: str, device: torch.device, dtype: str = "auto", load_in_8bit: bool = False,
                 trust_remote_code: bool = False, max_prompt_tokens: int | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        is_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # a hub id is "org/name" or "name"
        if is_path and not Path(name).expanduser().exists():
            raise UserError(f"explainer path {name} does not exist")
        name = str(Path(name).expanduser()) if is_path else name
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise UserError(f"cannot load the explainer {name!r}: {str(e).splitlines()[0][:200]} (a hub id needs the "
                            "network or a cached copy; a local folder needs config.json)") from None
        except ValueError as e:
            raise UserError(f"cannot load the explainer {name!r}: {str(e).splitlines()[0][:200]}") from None
        self.kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
        self.device = device
        kwargs = {"trust_remote_code": trust_remote_code, "dtype": _resolve_dtype(dtype, device)}
        if load_in_8bit:
            if device.type != "cuda":
                raise UserError("--load_in_8bit needs a CUDA device")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": device.index or 0}
        loader = AutoModelForSeq2SeqLM if self.kind == "seq2seq" else AutoModelForCausalLM
        try:
            self.model = loader.from_pretrained(name, **kwargs)
        except ValueError as e:  # e.g. a config that is neither seq2seq nor causal
            raise UserError(f"{name!r} is neither a seq2seq nor a causal language model: "
                            f"{str(e).splitlines()[0][:160]}") from None
        if not load_in_8bit:
            self.model.to(device)  # type: ignore[arg-type]  # transformers' stub of .to
        self.model.eval()
        self.tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left" if self.kind == "causal" else "right"
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if self.kind == "seq2seq":
            limit = 512  # T5 has relative positions; Flan-T5 was trained on 512-token inputs
        # positions one forward pass may span: a causal model's prompt *and* what it generates; a seq2seq
        # model's encoder input (the prompt) alone, its decoder having positions of its own
        self.context = limit or 2048
        self.max_prompt_tokens = max_prompt_tokens or min(self.context, 4096)
        self.name = name
        self._yes, self._no = yes_no_ids(self.tok, name)
        self._digits: list[list[int]] | None = None  # read when simulation first needs them

    def _format(self, prompt: str) -> str:
        if self.kind == "causal" and getattr(self.tok, "chat_template", None):
            return str(self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True))
        return prompt

    def count_tokens(self, prompt: str) -> int:
        return len(self.tok(self._format(prompt), add_special_tokens=True).input_ids)

    def prompt_budget(self, max_new_tokens: int) -> int:
        """The longest prompt (in `count_tokens`' tokens) that still leaves room to generate `max_new_tokens`:
        a causal model's prompt and new tokens share its context (prompt + new ≤ context); a seq2seq
        model's prompt has the encoder's limit to itself."""
        if self.kind == "seq2seq":
            return self.max_prompt_tokens
        budget = min(self.max_prompt_tokens, self.context - max_new_tokens)
        if budget < 1:
            raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in {self.name}'s "
                            f"context of {self.context} positions")
        return budget

    def _encode(self, prompts: list[str], max_length: int | None = None):
        return self.tok([self._format(p) for p in prompts], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length or self.max_prompt_tokens,
                        add_special_tokens=self.kind == "seq2seq").to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, sample: bool = False, seed: int = 0) -> list[str]:
        batch = self._encode(prompts, self.prompt_budget(max_new_tokens))  # room left for the new tokens
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tok.pad_token_id}
        if sample:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=0.8, top_p=0.95)
        else:
            kwargs.update(do_sample=False, num_beams=1)
        out = self.model.generate(**batch, **kwargs)
        if self.kind == "causal":
            out = out[:, batch["input_ids"].shape[1]:]
        return self.tok.batch_decode(out, skip_special_tokens=True)

    def _next_token_logits(self, prompts: list[str]) -> torch.Tensor:
        """(N, vocab) logits of the first answer token of each prompt: one forward step."""
        batch = self._encode(prompts)
        if self.kind == "seq2seq":
            start = torch.full((len(prompts), 1), self.model.config.decoder_start_token_id, device=self.device)
            return self.model(**batch, decoder_input_ids=start).logits[:, -1]
        # left padding: the last column is every prompt's end; positions count real tokens only
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        return self.model(**batch, position_ids=positions).logits[:, -1]

    @torch.no_grad()
    def yes_probability(self, prompts: list[str]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) for the first answer token: one forward step, no free text."""
        logits = self._next_token_logits(prompts)
        probs = torch.softmax(logits.float(), dim=-1)
        yes, no = probs[:, self._yes].sum(-1), probs[:, self._no].sum(-1)
        return (yes / (yes + no).clamp_min(1e-30)).tolist()

    @torch.no_grad()
    def expected_digits_all_at_once(self, prompts: list[str], lines: list[list[str]]) -> list[list[float]]:
        """For each prompt and its lines: the expected digit 0–9 after every line, from ONE forward pass.

        The answer is written out as "<line 1> = ? <line 2> = ? …" (the decoder's input for a seq2seq
        model, the continuation of the prompt for a causal one) and the digit distribution is read at
        each "=": the prediction for line k sees the prompt and the earlier lines with their
        placeholders, never another prediction (the "all at once" reading of simulation)."""
        if self._digits is None:
            self._digits = digit_ids(self.tok, self.name)
        ids = lambda text: self.tok(text, add_special_tokens=False).input_ids  # noqa: E731
        placeholder = ids(" ?")
        answers, reads = [], []
        for rows in lines:
            seq, at = [], []
            for row in rows:
                seq += ids(f" {row} =")
                at.append(len(seq) - 1)  # the logits here predict the digit of this line
                seq += placeholder
            answers.append(seq)
            reads.append(at)
        pad = self.tok.pad_token_id
        width = max(map(len, answers))
        if self.kind == "seq2seq":
            batch = self._encode(prompts)
            start = self.model.config.decoder_start_token_id
            dec = torch.tensor([[start, *a, *[pad] * (width - len(a))] for a in answers], device=self.device)
            dec_mask = torch.tensor([[1] * (1 + len(a)) + [0] * (width - len(a)) for a in answers], device=self.device)
            logits = self.model(**batch, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
            offsets = [1] * len(answers)  # the decoder start token comes first
        else:  # prompt + answer, left padded as a whole
            heads = [self.tok(self._format(p), add_special_tokens=False).input_ids for p in prompts]
            full = [h + a for h, a in zip(heads, answers)]
            longest = max(map(len, full))
            input_ids = torch.tensor([[pad] * (longest - len(f)) + f for f in full], device=self.device)
            mask = torch.tensor([[0] * (longest - len(f)) + [1] * len(f) for f in full], device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
            offsets = [longest - len(f) + len(h) for f, h in zip(full, heads)]
        values = torch.arange(10, dtype=torch.float32, device=self.device)
        out = []
        for i, at in enumerate(reads):
            probs = torch.softmax(logits[i, [offsets[i] + j for j in at]].float(), dim=-1)  # (lines, vocab)
            mass = torch.stack([probs[:, d].sum(-1) for d in self._digits], dim=-1)  # (lines, 10)
            out.append(((mass * values).sum(-1) / mass.sum(-1).clamp_min(1e-30)).tolist())
        return out
