"""Corpora for `python -m cembed train`: a synthetic corpus with planted topics (the default: no
download, deterministic, generated in seconds) and plain UTF-8 text files.

The synthetic corpus has ``vocab_size`` words with Zipf frequencies, each word belonging to one of
``n_topics`` latent topics. Sentences are drawn topic by topic: pick a topic, then draw most words from
that topic's Zipf-weighted vocabulary and a few from the whole vocabulary (noise). Because the topic
of every word is known, the quality of the learned embeddings can be measured (same-topic precision of
nearest neighbours), which plain text does not allow.
"""
import array
import codecs
import collections
import functools
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np


@dataclass
class Corpus:
    """Token ids with sentence boundaries, the vocabulary and (for synthetic data) the topics."""

    tokens: np.ndarray            # (n_tokens,) int32 word ids
    sentence_starts: np.ndarray   # (n_sentences + 1,) int64 boundaries into tokens
    words: Sequence[str]          # id -> word (a list, or _SyntheticWords)
    counts: np.ndarray            # (vocab_size,) int64 occurrences in tokens
    topics: Optional[np.ndarray] = None  # (vocab_size,) int32 topic of each word, or None
    n_topics: int = 0
    description: str = ""

    @property
    def vocab_size(self):
        return len(self.words)

    @property
    def n_tokens(self):
        return int(self.tokens.size)

    def sentence_ids(self):
        """(n_tokens,) int32: the sentence each token belongs to."""
        lengths = np.diff(self.sentence_starts)
        return np.repeat(np.arange(lengths.size, dtype=np.int32), lengths)


class _SyntheticWords(collections.abc.Sequence):
    """Word strings generated on demand ("w0", "w1", ...) so a 1M-word vocabulary costs nothing."""

    def __init__(self, n):
        self._n = n

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [f"w{j}" for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return f"w{i % self._n}"


def _zipf_cdf(n, exponent):
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def synthetic_corpus(vocab_size=1_000_000, n_topics=100, n_tokens=8_000_000, sentence_length=20,
                     exponent=1.0, noise=0.1, seed=0):
    """A deterministic corpus with planted topics (see the module docstring).

    Word ids are ordered by expected frequency in blocks of ``n_topics``: block r holds the r-th most
    frequent word of every topic, with the topics shuffled inside the block, so id 0 is among the most
    frequent words and the topic cannot be read off the id."""
    if vocab_size < n_topics or n_topics < 1:
        raise ValueError(f"need vocab_size >= n_topics >= 1, got vocab_size={vocab_size}, n_topics={n_topics}")
    rng = np.random.default_rng(seed)
    per_topic = vocab_size // n_topics
    vocab_size = per_topic * n_topics
    # word_of[r, t]: the id of topic t's r-th most frequent word; topics shuffled within each block
    shuffle = np.argsort(rng.random((per_topic, n_topics)), axis=1)
    word_of = (np.arange(per_topic, dtype=np.int64)[:, None] * n_topics + shuffle).astype(np.int32)
    topics = np.empty(vocab_size, dtype=np.int32)
    topics[word_of.reshape(-1)] = np.tile(np.arange(n_topics, dtype=np.int32), per_topic)

    n_sentences = max(1, n_tokens // sentence_length)
    n_tokens = n_sentences * sentence_length
    sentence_topic = rng.integers(0, n_topics, n_sentences)
    token_topic = np.repeat(sentence_topic, sentence_length)
    rank = np.searchsorted(_zipf_cdf(per_topic, exponent), rng.random(n_tokens))
    tokens = word_of[np.minimum(rank, per_topic - 1), token_topic]
    is_noise = rng.random(n_tokens) < noise
    n_noise = int(is_noise.sum())
    tokens[is_noise] = np.minimum(np.searchsorted(_zipf_cdf(vocab_size, exponent), rng.random(n_noise)),
                                  vocab_size - 1)
    sentence_starts = np.arange(0, n_tokens + 1, sentence_length, dtype=np.int64)
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.int64)
    return Corpus(tokens=tokens.astype(np.int32), sentence_starts=sentence_starts, words=_SyntheticWords(vocab_size),
                  counts=counts, topics=topics, n_topics=n_topics,
                  description=(f"synthetic: {vocab_size:,} words, {n_topics} topics, {n_tokens:,} tokens, "
                               f"Zipf({exponent}) frequencies, {noise:.0%} noise words, seed {seed}"))


@functools.lru_cache(maxsize=1)
def token_pattern():
    r"""Words: runs of letters, digits and combining marks (Unicode categories L, N, M; Python's ``\w``
    alone leaves out the marks, which cut words of Devanagari, Tamil, ... and decomposed accents apart:
    "हिन्दी" gave "ह", "न", "द"), joined by inner apostrophes. Built on first use (the marks' class takes
    a pass over Unicode's code points, ~0.2 s)."""
    marks, start = [], None
    for code in range(sys.maxunicode + 2):
        is_mark = code <= sys.maxunicode and unicodedata.category(chr(code)).startswith("M")
        if is_mark and start is None:
            start = code
        elif not is_mark and start is not None:
            marks.append(f"{re.escape(chr(start))}-{re.escape(chr(code - 1))}")
            start = None
    word = rf"[\w{''.join(marks)}]+"
    return re.compile(rf"{word}(?:['’]{word})*", re.UNICODE)


class CorpusError(ValueError):
    """A corpus file that cannot be used (missing, unreadable, empty, no word above min_count)."""


#: Characters of text read at a time, and the longest piece of one line held before its words are
#: taken (a corpus that is one line, as text8 is, is read in pieces of about this size).
READ_CHARS = 1 << 20
LONGEST_PIECE = 1 << 20
#: Punctuation that case mapping looks across (Unicode's MidLetter, MidNumLet and Single_Quote:
#: case-ignorable): a piece is never cut after one, so lowercasing a piece gives what lowercasing the
#: whole line gives (a final sigma stays final, or not, as in the line).
_CASE_IGNORABLE_PUNCTUATION = frozenset(":·\u0387\u05f4\u2027\ufe13\ufe55\uff1a.'‘’\u2024\ufe52\uff07\uff0e")


def _cut_after(text):
    """Where a long piece of a line is cut: after its last white space, else after its last character
    that no word contains and that case mapping does not look across (most punctuation, symbols:
    "，" and "。" in Chinese text without spaces); ``len(text)`` when it has none (a word that long is
    cut). Scans from the end, usually a few characters."""
    for i in range(len(text) - 1, -1, -1):
        c = text[i]
        if c.isspace():
            return i + 1
        if c.isalnum() or c == "_" or c in _CASE_IGNORABLE_PUNCTUATION:
            continue
        if unicodedata.category(c) not in ("Mn", "Mc", "Me", "Cf", "Lm", "Sk"):
            return i + 1
    return len(text)


def _sentence_pieces(path, lowercase):
    """The file's sentences as ``(words, ends)`` pieces: the words of one line (``str.splitlines``'s
    line breaks, U+2028 included), or of a part of a line longer than ``LONGEST_PIECE`` characters
    (cut where no word can go on, :func:`_cut_after`; ``ends`` False: the sentence goes on in the next
    piece). The file is streamed in blocks of ``READ_CHARS`` characters: memory stays bounded however
    long a line is (a line was once read whole: a 100 MB one-line corpus became 100 MB strings and ~17M
    word objects at once)."""
    token = token_pattern()
    read_chars, longest_piece = READ_CHARS, LONGEST_PIECE

    def words_of(text):
        return token.findall(text.lower() if lowercase else text)

    try:
        with open(path, encoding="utf-8") as fh:
            carry = ""
            while True:
                block = fh.read(read_chars)
                if not block:
                    break
                lines = (carry + block).splitlines(keepends=True)
                carry = lines.pop() if lines and lines[-1].splitlines()[0] == lines[-1] else ""
                for line in lines:
                    yield words_of(line), True
                if len(carry) > longest_piece:
                    cut = _cut_after(carry)
                    yield words_of(carry[:cut]), False
                    carry = carry[cut:]
            yield words_of(carry), True
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"corpus path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as exc:   # (exc.start counts from the decoder's chunk: the file's offset is found)
        # (only a regular file is read again to find it: a pipe is drained, or would wait for its writer)
        at = _first_bad_utf8_byte(path) if os.path.isfile(path) else -1
        raise CorpusError(f"corpus file is not valid UTF-8: {path} ({exc.reason}"
                          f"{f' at byte {at}' if at >= 0 else ''})") from None
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror}") from None


def _first_bad_utf8_byte(path, block=1 << 20):
    """The file offset of the first byte that is not valid UTF-8 (-1 if none: the file changed)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(block)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                return fed - pending + exc.start
            if not chunk:
                return -1
            fed += len(chunk)


def text_corpus(path, min_count=5, max_vocab=None, lowercase=True):
    """Tokenise a UTF-8 text file (one sentence per line; words are runs of letters, digits and combining
    marks: ``token_pattern``), keep the words seen at least ``min_count`` times (the ``max_vocab`` most
    frequent, ties in order of first appearance), ids by frequency; sentences with fewer than two kept
    words are dropped.

    One streamed pass over the file: each word gets a provisional id as it is first seen (4 bytes per
    token), then the vocabulary is chosen and the ids renumbered with array operations. Memory is the
    distinct words plus a few bytes per token, not the text (reading the whole file into lists of word
    strings peaked at ~28× the file's size)."""
    first_seen: Dict[str, int] = {}                    # word -> provisional id, in order of first appearance
    provisional, lengths = array.array("i"), array.array("q")
    length = 0
    for words, ends in _sentence_pieces(path, lowercase):
        provisional.extend([first_seen.setdefault(w, len(first_seen)) for w in words])
        length += len(words)
        if ends and length:
            lengths.append(length)
            length = 0
    if not first_seen:
        raise CorpusError(f"corpus file has no words: {path}")
    pid = np.frombuffer(provisional, dtype=np.int32)
    freq = np.bincount(pid, minlength=len(first_seen))
    order = np.argsort(-freq, kind="stable")[:max_vocab]   # most frequent first, ties by first appearance
    order = order[freq[order] >= min_count]
    if order.size == 0:
        raise CorpusError(f"no word occurs at least --min-count={min_count} times in {path} "
                          f"({len(first_seen)} distinct words; the most frequent occurs {int(freq.max())} times)")
    new_id = np.full(len(first_seen), -1, dtype=np.int64)
    new_id[order] = np.arange(order.size)
    ids = new_id[pid]
    sentence = np.repeat(np.arange(len(lengths)), np.frombuffer(lengths, dtype=np.int64))
    kept = ids >= 0
    per_sentence = np.bincount(sentence[kept], minlength=len(lengths))
    usable = per_sentence >= 2
    tokens = ids[kept & usable[sentence]].astype(np.int32)
    if tokens.size < 2:
        raise CorpusError(f"corpus file {path} has no sentence with two words above --min-count={min_count}")
    starts = np.concatenate([[0], np.cumsum(per_sentence[usable])]).astype(np.int64)
    words = list(first_seen)
    kept_words = [words[i] for i in order]
    counts = np.bincount(tokens, minlength=len(kept_words)).astype(np.int64)
    return Corpus(tokens=tokens, sentence_starts=starts, words=kept_words, counts=counts,
                  description=(f"{path}: {len(kept_words):,} words (min count {min_count}), "
                               f"{tokens.size:,} tokens, {starts.size - 1:,} sentences"))
