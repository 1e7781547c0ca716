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
word length. For long words a heap holds the candidate pairs; a merge only creates the
two new pairs around the merged symbol, and stale heap entries (a pair one of
whose symbols has since changed) are skipped when popped. That is O(n log n),
so a 100 000-character word without spaces is no problem.

Short words, which are nearly all words, take a simpler path: the
priorities of the adjacent pairs sit in a list, and `min()` + `index()`
find the best pair at C speed. That is quadratic in the word length, so it
is used only up to `SHORT_WORD` symbols; both paths merge in the same order.

Worked example, with ranks for the merges "a b" (0) and "ab c" (1)::

    >>> ranks = {("a", "b"): 0, ("ab", "c"): 1}
    >>> bpe_merge(list("abcab"), ranks)
    ['abc', 'ab']
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from typing import Optional

#: (left, right) -> priority of merging them (lower merges first); absent: never.
PairPriorities = dict[tuple[str, str], float]

#: Words up to this many symbols use the short-word loop; longer ones the heap.
SHORT_WORD = 48
_NEVER = float("inf")


def bpe_merge(symbols: list[str], priorities: PairPriorities,
              pushed: Optional[dict[str, tuple[str, str]]] = None) -> list[str]:
    """Merge `symbols` (modified in place) and return the final symbols.

    `pushed`, when given, records for every candidate pair the two symbols it
    was made of (merged string -> (left, right)); SentencePiece needs it to
    split "unused" pieces back (see `SentencePieceBPE`).
    """
    if len(symbols) < 2:
        return symbols
    if len(symbols) > SHORT_WORD or pushed is not None:
        return _merge_with_heap(symbols, priorities, pushed)
    # Short words (nearly all words): keep the priority of each adjacent pair
    # in a list; min() and index() find the best, leftmost pair at C speed,
    # and a merge only recomputes the two pairs around the merged symbol.
    get = priorities.get
    prio = [get((a, b), _NEVER) for a, b in zip(symbols, symbols[1:])]
    while prio:
        best = min(prio)
        if best == _NEVER:
            break
        i = prio.index(best)
        merged = symbols[i] + symbols[i + 1]
        symbols[i] = merged
        del symbols[i + 1]
        del prio[i]
        if i > 0:
            prio[i - 1] = get((symbols[i - 1], merged), _NEVER)
        if i < len(prio):
            prio[i] = get((merged, symbols[i + 1]), _NEVER)
    return symbols


def _merge_with_heap(symbols: list[str], priorities: PairPriorities,
                     pushed: Optional[dict[str, tuple[str, str]]]) -> list[str]:
    """The same merges in O(n log n), for long words (see module doc)."""
    get = priorities.get
    n = len(symbols)
    # A doubly linked list over the positions: a merge keeps the left
    # position and empties the right one.
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, str, str]] = []
    for i in range(n - 1):
        left, right = symbols[i], symbols[i + 1]
        p = get((left, right))
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
            p = get((symbols[h], merged))
            if p is not None:
                heappush(heap, (p, h, symbols[h], merged))
                if pushed is not None:
                    pushed[symbols[h] + merged] = (symbols[h], merged)
        if k >= 0:
            p = get((merged, symbols[k]))
            if p is not None:
                heappush(heap, (p, i, merged, symbols[k]))
                if pushed is not None:
                    pushed[merged + symbols[k]] = (merged, symbols[k])
    return [s for s in symbols if s]
