"""Encode throughput of xllm's tokenizers, beside sentencepiece and HF tokenizers.

    python -m bench.tokenizer_speed [--smollm2 PATH.gguf] [--llama2 PATH.model] [--mb 1.0] [--repeat 3]

--smollm2 defaults to the default model's GGUF, found like the CLI finds it
(downloaded once into $XLLM_CACHE, by default ~/.cache/xllm). The text is
../shared/data/shareGPT_sample.txt repeated to --mb megabytes
(UTF-8), encoded as one string. For each family the table shows, measured in
the same run on the same text:

* xllm, cold: a freshly loaded tokenizer, so its per-word cache starts empty
  (the first copy of the sample fills it, the repeats hit it);
* xllm, sample once: a fresh tokenizer encoding the sample once (13 kB of
  text it has never seen; words still repeat within it, as in any text);
* xllm, no cache: every word merged again (the worst case: text whose words
  never repeat);
* the C++/Rust reference: `sentencepiece` for Llama 2, HF `tokenizers` for
  SmolLM2 (built from the GGUF's vocabulary and merges, one thread).

Each number is the best of --repeat runs, in MB/s of UTF-8 input. The ids of
xllm and the reference are checked to be equal. A second table encodes the
same text line by line (the references are much faster on short inputs
than on one 1 MB string).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


class _NoCache(dict):
    """A dict that never keeps anything: disables xllm's per-word cache."""

    def __setitem__(self, key, value):
        pass


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _smollm2_reference(path: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from xllm.tokenizer.gguf_loader import read_gguf_tokenizer_metadata

    meta = read_gguf_tokenizer_metadata(path)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    hf = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                              [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokens[i], special=True) for i, t in enumerate(types) if t == 3])
    return lambda text: hf.encode(text, add_special_tokens=False).ids


def _llama2_reference(path: Path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return sp.encode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tokenizer_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2", default=None, metavar="PATH.gguf",
                    help="a byte-level BPE GGUF (default: the default model, downloaded into $XLLM_CACHE "
                         "or ~/.cache/xllm on first use, as by the CLI)")
    ap.add_argument("--llama2", default=str(SHARED / "llama2-tokenizer.model"))
    ap.add_argument("--text", default=str(SHARED / "shareGPT_sample.txt"))
    ap.add_argument("--mb", type=float, default=1.0, help="size of the text in MB (1e6 bytes)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: one thread, like us
    from xllm.tokenizer import load_tokenizer

    sample = Path(args.text).read_text(encoding="utf-8")
    text = sample
    while len(text.encode("utf-8")) < args.mb * 1e6:
        text += "\n" + sample
    size_mb = len(text.encode("utf-8")) / 1e6

    if args.smollm2:
        smol = Path(args.smollm2)
    else:
        from xllm.download import default_model_path
        smol = default_model_path(log=lambda m: print(m, file=sys.stderr))
    rows = []
    for family, path, reference, ref_name in (
            ("byte-level BPE (SmolLM2)", smol, _smollm2_reference, "HF tokenizers"),
            ("SentencePiece BPE (Llama 2)", Path(args.llama2), _llama2_reference, "sentencepiece")):
        if not path.exists():
            print(f"skipping {family}: {path} not found", file=sys.stderr)
            continue
        ref = reference(path)
        ref_ids = ref(text)
        ref_t = _best(lambda: ref(text), args.repeat)

        def cold():
            tok = load_tokenizer(path)
            gc.collect()  # time the encoding, not the collection of the loader's garbage
            t = time.perf_counter()
            ids = tok.encode(text)
            return time.perf_counter() - t, ids
        cold_t, ids = min((cold() for _ in range(args.repeat)), key=lambda r: r[0])
        assert ids == ref_ids, f"{family}: xllm and {ref_name} disagree"
        def once():
            tok = load_tokenizer(path)
            gc.collect()
            t = time.perf_counter()
            tok.encode(sample)
            return time.perf_counter() - t
        once_t = min(once() for _ in range(args.repeat))
        sample_mb = len(sample.encode("utf-8")) / 1e6
        tok = load_tokenizer(path)
        tok._cache = _NoCache()
        nocache_t = _best(lambda: tok.encode(text), 1)
        lines = text.split("\n")
        tok = load_tokenizer(path)
        gc.collect()
        lines_t = _best(lambda: [tok.encode(line) for line in lines], args.repeat)
        ref_lines_t = _best(lambda: [ref(line) for line in lines], args.repeat)
        rows.append((family, size_mb / cold_t, sample_mb / once_t, size_mb / nocache_t, ref_name,
                     size_mb / ref_t, len(ids), size_mb / lines_t, size_mb / ref_lines_t))

    print(f"text: {Path(args.text).name} repeated to {size_mb:.2f} MB; "
          f"python {platform.python_version()}, {platform.machine()}, best of {args.repeat}")
    print(f"{'tokenizer':28} {'tokens':>7} {'xllm cold':>11} {'sample once':>12} {'no cache':>11}"
          f"   {'reference':>25}")
    for family, cold_mbs, once_mbs, nocache_mbs, ref_name, ref_mbs, n, _, _ in rows:
        print(f"{family:28} {n:7d} {cold_mbs:6.2f} MB/s {once_mbs:7.2f} MB/s {nocache_mbs:6.2f} MB/s   "
              f"{ref_name:>14} {ref_mbs:5.2f} MB/s")
    print("\nline by line (the same text, one encode call per line):")
    for family, *_, ref_name, _, _, lines_mbs, ref_lines_mbs in rows:
        print(f"{family:28} xllm {lines_mbs:6.2f} MB/s   {ref_name:>14} {ref_lines_mbs:6.2f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
