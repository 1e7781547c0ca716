"""The BPE merge loop shared by both tokenizer families.

BPE starts from a word cut into single characters and repeatedly merges the
*best* adjacent pair into one symbol until no adjacent pair is mergeable.
"Best" is where the two families differ, and only there:

* byte-level BPE (GPT-2, Llama 3, SmolLM2): the pair that comes first in the
  model's ranked merge list (`rank`, lower is better);
* SentencePiece BPE (Llama 2): the pair whose concatenation is the vocabulary
  piece with the highest score (we use `-score`, so lower is better again).

Ties go to the leftmost pair. That is how Hugging Face `tokenizers`
(`Word::merge_all`) and `sentencepiece` (`bpe_model.cc`) both break them,
and it matters: "aaa" with the merge "a a" must become ["aa", "a"].

The naive loop rescans every pair after each merge, which is quadratic in the
word length. Here a heap holds the candidate pairs; a merge only creates the
two new pairs around the merged symbol, and stale heap entries (a pair one of
whose symbols has since changed) are skipped when popped. That is O(n log n),
so a 100 000-character word without spaces is no problem.

Worked example, with ranks for the merges "a b" (0) and "ab c" (1)::

    >>> ranks = {("a", "b"): 0, ("ab", "c"): 1}
    >>> bpe_merge(list("abcab"), lambda l, r: ranks.get((l, r)))
    ['abc', 'ab']
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from typing import Callable, Optional

#: Priority of merging the adjacent symbols (left, right); None: never merge.
PairPriority = Callable[[str, str], Optional[float]]


def bpe_merge(symbols: list[str], priority: PairPriority,
              pushed: Optional[dict[str, tuple[str, str]]] = None) -> list[str]:
    """Merge `symbols` (modified in place) and return the final symbols.

    `pushed`, when given, records for every candidate pair the two symbols it
    was made of (merged string -> (left, right)); SentencePiece needs it to
    split "unused" pieces back (see `SentencePieceBPE`).
    """
    n = len(symbols)
    if n < 2:
        return symbols
    # A doubly linked list over the positions: a merge keeps the left
    # position and empties the right one.
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, str, str]] = []
    for i in range(n - 1):
        left, right = symbols[i], symbols[i + 1]
        p = priority(left, right)
        if p is not None:
            heap.append((p, i, left, right))
            if pushed is not None:
                pushed[left + right] = (left, right)
    heapify(heap)
    while heap:
        _, i, left, right = heappop(heap)
        j = nxt[i]
        # Stale: symbol i or its right neighbour changed since this entry was pushed.
        if j < 0 or symbols[i] != left or symbols[j] != right:
            continue
        merged = left + right
        symbols[i] = merged
        symbols[j] = ""  # emptied; never equal to a pushed symbol
        k = nxt[j]
        nxt[i] = k
        if k >= 0:
            prv[k] = i
        h = prv[i]
        if h >= 0:
            p = priority(symbols[h], merged)
            if p is not None:
                heappush(heap, (p, h, symbols[h], merged))
                if pushed is not None:
                    pushed[symbols[h] + merged] = (symbols[h], merged)
        if k >= 0:
            p = priority(merged, symbols[k])
            if p is not None:
                heappush(heap, (p, i, merged, symbols[k]))
                if pushed is not None:
                    pushed[merged + symbols[k]] = (merged, symbols[k])
    return [s for s in symbols if s]
