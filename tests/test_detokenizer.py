"""The incremental detokenizer on a byte-level BPE tokenizer: multi-byte characters split across
tokens, stop strings across token boundaries, held-back text, special tokens."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncllm.engine.detokenizer import IncrementalDetokenizer, decode_token
from asyncllm.sampling_params import SamplingParams
from tests.tiny_models import build_tokenizer

TEXTS = [
    "Emoji: 😀 🚀 🎉 👍🏽 ❤️ 🇫🇷",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Café, naïve, résumé, façade, jalapeño, Zürich, São Paulo.",
    "Mixed 😀日本Zürich🎉 end",
    "🚀🚀🚀 a🇫🇷b",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _stream(tok, ids, params=None, prompt=(), chunk=1):
    """Feed ids `chunk` at a time; return (deltas, detokenizer, matched stop string)."""
    d = IncrementalDetokenizer(tok, list(prompt), params or SamplingParams())
    deltas = []
    matched = None
    for i in range(0, len(ids), chunk):
        prev = d.output_text
        matched = d.add_tokens(ids[i : i + chunk])
        assert d.output_text.startswith(prev)  # append-only
        deltas.append(d.output_text[len(prev) :])
        if matched is not None:
            break
    if matched is None:
        prev = d.output_text
        d.finish()
        assert d.output_text.startswith(prev)
        deltas.append(d.output_text[len(prev) :])
    return deltas, d, matched


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_are_never_split(tok, text):
    ids = tok.encode(text)
    # The test means something: some tokens hold only part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, d, _ = _stream(tok, ids)
    assert not any("\ufffd" in x for x in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    assert d.output_text == text
    # Streaming: after each token, every complete character so far is shown at once.
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    for n in range(1, len(ids) + 1):
        d.add_tokens([ids[n - 1]])
        so_far = tok.decode(ids[:n])
        if not so_far.endswith("\ufffd"):
            assert d.output_text == so_far


def test_prompt_context_and_chunks(tok):
    prompt = tok.encode("Hello world! ")
    ids = tok.encode("The sky is blue 😀 and 日本")
    for chunk in (1, 2, 3, 7):
        deltas, d, _ = _stream(tok, ids, prompt=prompt, chunk=chunk)
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in x for x in deltas)


def test_prompt_context_for_sentencepiece_style_decoders():
    """Metaspace decoders drop the leading space of the first decoded token: the prompt's last
    tokens are left context, so a generated word keeps its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import CORPUS

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    sp = PreTrainedTokenizerFast(tokenizer_object=t)
    ids = sp.encode("Hello world, the sky is blue", add_special_tokens=False)
    assert sp.decode(ids[2:]) != sp.decode(ids)[len(sp.decode(ids[:2])) :]  # the quirk exists
    deltas, d, _ = _stream(sp, ids[2:], prompt=ids[:2])
    assert "".join(deltas) == sp.decode(ids)[len(sp.decode(ids[:2])) :]


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("😀 🚀 ok")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    _, d, _ = _stream(tok, ids[cut:], prompt=ids[:cut])
    assert d.output_text == tok.decode(ids[cut:])  # the output's own bytes, nothing lost


def _stop_case(tok, text, stop):
    ids = tok.encode(text)
    pos = text.index(stop)
    # The stop string straddles tokens: no single token contains it.
    assert all(stop not in tok.decode([i]) for i in ids)
    return ids, pos


@pytest.mark.parametrize(
    "text,stop",
    [
        ("The capital of France is Paris. The capital of Japan is Tokyo.", "France is"),
        ("Emoji: 😀 🚀 🎉 end", "🚀 🎉"),
        ("日本語のテキスト、中文文本", "テキスト、中"),
        ("Café, naïve, résumé", "ïve, r"),
    ],
)
def test_stop_strings_across_tokens(tok, text, stop):
    ids, pos = _stop_case(tok, text, stop)
    deltas, d, matched = _stream(tok, ids, SamplingParams(stop=[stop, "never"]))
    assert matched == stop and d.stop_reason == stop
    assert d.output_text == text[:pos] == "".join(deltas)
    assert not any(stop[:2] in x for x in deltas)  # the stop string's start was held, not shown

    deltas, d, matched = _stream(
        tok, ids, SamplingParams(stop=[stop], include_stop_str_in_output=True)
    )
    assert matched == stop
    assert d.output_text == text[: pos + len(stop)] == "".join(deltas)
    # Tokens after a match change nothing.
    assert d.add_tokens(tok.encode(" more")) is None and d.output_text.endswith(stop)


def test_earliest_stop_string_wins(tok):
    text = "Once upon a time there was a little model"
    _, d, matched = _stream(tok, tok.encode(text), SamplingParams(stop=["little", "time", "a t"]))
    assert matched == "a t" and d.output_text == "Once upon "


def test_held_back_prefix_is_released(tok):
    text = "Hello world! The sky is blue."
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["world peace"]))
    seen_hold = False
    for i in ids:
        assert d.add_tokens([i]) is None
        decoded = tok.decode(ids[: ids.index(i) + 1])
        if decoded.endswith("world"):
            assert d.output_text == "Hello "  # "world" could start "world peace"
            seen_hold = True
    assert seen_hold
    assert d.output_text == text  # released once "!" ruled the stop string out

    # Held at the end, then released by finish() (EOS or length).
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["world peace"]))
    d.add_tokens(tok.encode("Hello wor"))
    assert d.output_text == "Hello "
    d.finish()
    assert d.output_text == "Hello wor"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok, skip):
    ids = tok.encode("Hello") + [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode(" world")
    params = SamplingParams(skip_special_tokens=skip)
    deltas, d, _ = _stream(tok, ids, params)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in d.output_text) is not skip


def test_finish_releases_an_incomplete_character(tok):
    ids = tok.encode("ab😀")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    d.add_tokens(ids[:cut])
    assert "\ufffd" not in d.output_text
    d.finish()
    assert d.output_text == tok.decode(ids[:cut])  # as a full decode shows it


def test_decode_token(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert decode_token(tok, end) == "<|im_end|>"
    for i in tok.encode("Hello 😀"):
        assert decode_token(tok, i) == tok.decode([i])


_ALPHABET = st.sampled_from(list("abc XYZ.,!\n") + list("éüñ日本語中文한국😀🚀🎉👍🏽❤️🇫🇷"))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(_ALPHABET, min_size=1, max_size=40),
    chunk=st.integers(1, 4),
    data=st.data(),
)
def test_random_texts(tok, text, chunk, data):
    ids = tok.encode(text)
    deltas, d, _ = _stream(tok, ids, chunk=chunk)
    assert not any("\ufffd" in x for x in deltas)
    assert "".join(deltas) == text
    # A stop string taken from the text cuts exactly there.
    a = data.draw(st.integers(0, len(text) - 1))
    b = data.draw(st.integers(a + 1, min(len(text), a + 6)))
    stop = text[a:b]
    include = data.draw(st.booleans())
    deltas, d, matched = _stream(
        tok, ids, SamplingParams(stop=[stop], include_stop_str_in_output=include), chunk=chunk
    )
    pos = text.index(stop)
    assert matched == stop
    assert "".join(deltas) == d.output_text == text[: pos + (len(stop) if include else 0)]


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.lists(st.integers(0, 399), min_size=1, max_size=30))
def test_random_token_ids(tok, ids):
    """Any id sequence (invalid UTF-8 included): the text is the full decode in the end."""
    for skip in (True, False):
        deltas, d, _ = _stream(tok, ids, SamplingParams(skip_special_tokens=skip))
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_fast_decode_uses_the_backend_only_where_it_agrees(tok):
    from asyncllm.engine import detokenizer as D

    fast = D.fast_decode(tok)
    assert fast == tok._tokenizer.decode  # the Rust backend, without transformers' wrapper
    ids = tok.encode("Café 😀 日本", add_special_tokens=False)
    for skip in (False, True):
        assert fast(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)

    class Wrapped:
        """A tokenizer whose decode post-processes the backend's text: no fast path."""

        def __init__(self, inner):
            self.inner = inner
            self._tokenizer = inner._tokenizer

        def __len__(self):
            return len(self.inner)

        def decode(self, ids, skip_special_tokens=False):
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens).upper()

    w = Wrapped(tok)
    assert D.fast_decode(w) == w.decode
    deltas, _, _ = _stream(w, ids)
    assert "".join(deltas) == tok.decode(ids).upper()

    class CleansUp(Wrapped):
        clean_up_tokenization_spaces = True

        def decode(self, ids, skip_special_tokens=False):
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    c = CleansUp(tok)
    assert D.fast_decode(c) == c.decode  # transformers would clean up: keep its decode


def test_min_tokens_holds_off_stop_strings(tok):
    """vLLM: a stop string counts only once more than min_tokens tokens are out, so "blue" in the
    first tokens does not end generation; a later one does."""
    text = "The sky is blue and the grass is green. The sky is blue"
    ids = tok.encode(text)
    first_blue = next(i for i in range(len(ids)) if "blue" in tok.decode(ids[: i + 1]))
    _, d, matched = _stream(tok, ids, SamplingParams(stop=["blue"]))
    assert matched == "blue" and d.output_text == "The sky is "
    params = SamplingParams(stop=["blue"], min_tokens=first_blue + 1)
    _, d, matched = _stream(tok, ids, params)
    assert matched == "blue"
    assert d.output_text == "The sky is blue and the grass is green. The sky is "


class _CharTokenizer:
    """Token id = code point: the text is exactly the ids (no BPE in the way)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _brute_hold(text: str, released: int, stops: list[str]) -> int:
    pending = len(text) - released
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, pending), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(alphabet="ab c", min_size=1, max_size=60),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=8), min_size=1, max_size=3),
    data=st.data(),
)
def test_held_back_text_matches_brute_force(text, stops, data):
    """The KMP matchers hold back exactly what trying every prefix of every stop would."""
    d = IncrementalDetokenizer(_CharTokenizer(), [], SamplingParams(stop=stops))
    ids = [ord(c) for c in text]
    i = 0
    while i < len(ids):
        n = data.draw(st.integers(1, 4))
        before = d._text
        if d.add_tokens(ids[i : i + n]) is not None:
            first = min((p, s) for s in stops if (p := d._text.find(s)) != -1)
            assert d.output_text == d._text[: first[0]]
            return
        assert d.output_text == d._text[: len(d._text) - _brute_hold(d._text, 0, stops)]
        assert d._text.startswith(before)
        i += n


def test_long_stop_string_costs_linear_time():
    """A long stop string whose prefix the text follows, then leaves: trying every prefix
    length (each an O(n) slice) cost ~n^2/2 character copies for the one token that rules it
    out (seconds at 200k); the matchers take one step per character."""
    import time

    n = 200_000
    stop = "a" * n + "b"
    d = IncrementalDetokenizer(_CharTokenizer(), [], SamplingParams(stop=[stop]))
    d.add_tokens([ord("a")] * (n - 1))
    assert d.output_text == ""  # all of it could be the stop string's start
    t0 = time.perf_counter()
    d.add_tokens([ord("c")])
    took = time.perf_counter() - t0
    assert d.output_text == "a" * (n - 1) + "c"
    assert took < 0.5, f"{took:.2f} s for one token"


# ---- the per-token fast path (ASYNCLLM_DETOK_FAST) ----------------------------------------------
def _both(tok, monkeypatch, ids, params, prompt=()):
    """Token-by-token deltas and the stop match with the fast path and without it."""
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ASYNCLLM_DETOK_FAST", flag)
        d = IncrementalDetokenizer(tok, list(prompt), params)
        assert (d._pieces is not None) == (flag == "1")
        deltas, matched = [], None
        for t in ids:
            prev = d.output_text
            matched = d.add_tokens([t])
            deltas.append(d.output_text[len(prev) :])
            if matched is not None:
                break
        if matched is None:
            d.finish()
        runs.append((deltas, matched, d.output_text))
    return runs


@pytest.mark.parametrize("skip", [True, False])
def test_fast_path_gives_the_windowed_text(tok, monkeypatch, skip):
    import random

    rng = random.Random(4)
    special = list(tok.all_special_ids)
    prompt = tok.encode("Hello there")
    for text in TEXTS + ["The capital of France is Paris."]:
        ids = tok.encode(text)
        # Special ids and random ids (split multi-byte characters) in between.
        mixed = []
        for t in ids:
            mixed.append(t)
            if rng.random() < 0.2:
                mixed.append(rng.choice(special + [rng.randrange(len(tok))]))
        for stop in (None, ["Paris"], ["😀", "本"]):
            params = SamplingParams(stop=stop, skip_special_tokens=skip)
            fast, slow = _both(tok, monkeypatch, mixed, params, prompt)
            assert fast == slow, (text, stop)


def test_fast_path_on_a_word_level_tokenizer(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from asyncllm.bench.model import _tokenizer

    _tokenizer(tmp_path, 500, 0)
    wl = AutoTokenizer.from_pretrained(tmp_path)
    from asyncllm.engine.detokenizer import concat_pieces, fast_decode

    assert concat_pieces(wl, fast_decode(wl), True)[1] == " "
    ids = [5, 17, 0, 400, 3, 3, 499]
    fast, slow = _both(wl, monkeypatch, ids, SamplingParams(stop=["<t3> <t3>"]), [1, 2])
    assert fast == slow
    assert fast[1] == "<t3> <t3>" and fast[2].startswith(" <t5> <t17>")


def test_fast_path_refuses_sentencepiece_style_decoding(tmp_path):
    # SentencePiece's Metaspace: a word's leading space shows after context, not alone.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from asyncllm.engine.detokenizer import concat_pieces, fast_decode
    from tests.tiny_models import CORPUS

    m = Tokenizer(models.BPE(unk_token="<unk>"))
    m.pre_tokenizer = pre_tokenizers.Metaspace()
    m.decoder = decoders.Metaspace()
    m.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    sp = PreTrainedTokenizerFast(tokenizer_object=m)
    assert concat_pieces(sp, fast_decode(sp), False) is None
