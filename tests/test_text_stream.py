"""From engine tokens to text (runtime/text_stream.py) with the default model's real tokenizer: no model."""

from __future__ import annotations

import asyncio

import pytest
from kaito.runtime.engine_api import TokenEvent
from kaito.runtime.text_stream import Detokenizer, Piece, TextStream, merge

END = "<|im_end|>"  # the default model's end-of-turn token, a special token


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def events(tok, text: str, finish: str = "length") -> list[TokenEvent]:
    """The events an engine would send for `text`: one per token, the last one finished."""
    ids = tok.encode(text, add_special_tokens=False)
    return [TokenEvent(token_id=t, finish_reason=finish if i == len(ids) - 1 else None) for i, t in enumerate(ids)]


def stream(tok, text: str, stops=(), finish: str = "length") -> list[Piece]:
    """The pieces TextStream hands out, up to the last one."""
    s, out = TextStream(tok, stops), []
    for ev in events(tok, text, finish):
        piece = s.add(ev)
        if piece is not None:
            out.append(piece)
            if piece.finish_reason:
                break
    return out


@pytest.mark.parametrize("text, split", [("The capital of France is Paris.", False),
                                         ("漢字 and 🦜 and 🧬 DNA", True), ("café naïve ǅ", True)])
def test_detokenizer_rebuilds_the_text_and_never_half_a_character(tok, text, split):
    ids = tok.encode(text, add_special_tokens=False)
    d = Detokenizer(tok)
    parts = [d.add(t) for t in ids]
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)
    assert ("" in parts) == split  # a token in the middle of a character waits for the rest


def test_detokenizer_skips_special_tokens(tok):
    d = Detokenizer(tok)
    text = "".join(d.add(t) for t in tok.encode("Hello." + END, add_special_tokens=False))
    assert text == "Hello."


def test_pieces_carry_all_text_and_tokens_and_the_engine_finish(tok):
    text = "The capital of France is Paris."
    pieces = stream(tok, text, finish="length")
    whole = Piece.join(pieces)
    assert whole.text == text and whole.finish_reason == "length"
    assert [e.token_id for e in whole.tokens] == tok.encode(text, add_special_tokens=False)
    assert all(p.finish_reason is None for p in pieces[:-1])


def test_a_stop_string_ends_the_text_before_it(tok):
    whole = Piece.join(stream(tok, "The capital of France is Paris. It is big.", stops=["Paris"]))
    assert whole.text == "The capital of France is " and whole.finish_reason == "stop"
    assert tok.decode([e.token_id for e in whole.tokens]).endswith("Paris")  # the tokens up to the hit
    # the first of several stop strings in the text wins, whatever the order they are given in
    assert Piece.join(stream(tok, "I have 4 cats and 42. Done", stops=["cats", "have"])).text == "I "


def test_text_that_could_become_a_stop_string_is_held_back(tok):
    # "4" could be the start of "42.": held back until the next token says whether it is
    pieces = stream(tok, "I have 4 cats and 42. Done", stops=["42."])
    assert Piece.join(pieces).text == "I have 4 cats and "
    assert not any(p.text.endswith("4") for p in pieces)
    assert any(p.text.startswith("4 cats") for p in pieces)  # the first "4" goes out with the next token
    # a stop string split over several tokens is found all the same
    assert Piece.join(stream(tok, "x = 42. Done", stops=["42."])).text == "x = "


def test_held_back_text_is_released_when_the_engine_finishes(tok):
    pieces = stream(tok, "The answer is 4", stops=["42."], finish="stop")
    assert Piece.join(pieces).text == "The answer is 4" and pieces[-1].finish_reason == "stop"


def test_join_of_nothing_is_an_empty_stop():
    assert Piece.join([]) == Piece("", [], "stop")


async def _pieces(texts: list[str], delay: float, log: list[str] | None = None, fail: bool = False):
    try:
        for t in texts:
            await asyncio.sleep(delay)
            yield Piece(t)
        if fail:
            raise RuntimeError("choice failed")
    finally:
        if log is not None:
            log.append("closed")


def test_merge_interleaves_choices_as_they_come():
    async def main():
        return [(i, p.text) async for i, p in merge([_pieces(["a1", "a2", "a3"], 0.03), _pieces(["b1", "b2"], 0.01)])]

    got = asyncio.run(main())
    assert [t for i, t in got if i == 0] == ["a1", "a2", "a3"] and [t for i, t in got if i == 1] == ["b1", "b2"]
    assert got[0] == (1, "b1")  # the faster choice first


def test_merge_raises_a_choice_error_and_stops_the_others():
    closed: list[str] = []

    async def main():
        async for _ in merge([_pieces(["a"] * 100, 0.01, closed), _pieces(["b"], 0.01, fail=True)]):
            pass

    with pytest.raises(RuntimeError, match="choice failed"):
        asyncio.run(main())
    assert closed == ["closed"]


def test_merge_of_one_choice():
    async def main():
        return [x async for x in merge([_pieces(["only"], 0)])]

    assert [(i, p.text) for i, p in asyncio.run(main())] == [(0, "only")]
