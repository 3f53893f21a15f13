import itertools
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glm130b.data.corpus import iter_documents
from glm130b.tokenizer import (
    SPECIAL_TOKENS,
    GLMTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    default_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# --- round trip ----------------------------------------------------------------------------------

# Fragments of English, CJK ideographs and punctuation, emoji, whitespace and special-token text.
_mixed = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0x3000, max_codepoint=0x303F),
    st.characters(min_codepoint=0xFF00, max_codepoint=0xFFEF),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF),  # CJK extension B: byte fallback
    st.sampled_from(["\n", "\r\n", "\t", " ", "  ", "\u3000", "\u00a0", "[MASK]", "<eop>"]),
)


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=150, deadline=None)
@given(st.lists(_mixed, max_size=60).map("".join))
def test_round_trip_mixed_english_chinese(tok, s):
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize(
    "text",
    [
        "In the beginning God created the heaven and the earth.",
        "起初，神创造天地。地是空虚混沌，渊面黑暗；神的灵运行在水面上。",
        "子曰：“学而时习之，不亦说乎？”\nConfucius said: 'Is it not pleasant to learn?' 🙂",
        "  leading and trailing spaces  \n\n\ttabs\r\n",
        "",
        "𠀀𪚥 rare ideographs and \x00 control \x7f bytes",
    ],
)
def test_round_trip_examples(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    texts = ["hello world", "你好，世界", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


# --- special tokens ------------------------------------------------------------------------------


def test_special_ids_in_order(tok):
    assert SPECIAL_TOKENS == ["<pad>", "<unk>", "<eos>", "<sop>", "<eop>", "[MASK]", "[gMASK]", "[sMASK]"]
    ids = [tok.pad_id, tok.unk_id, tok.eos_id, tok.sop_id, tok.eop_id, tok.mask_id, tok.gmask_id, tok.smask_id]
    assert ids == list(range(8))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(8))
    assert [tok.id_to_token(i) for i in range(8)] == SPECIAL_TOKENS


def test_mask_in_text(tok):
    assert tok.encode("[MASK]") == [tok.mask_id]
    assert tok.encode("[gMASK]") == [tok.gmask_id]
    ids = tok.encode("Paris is the [MASK] of France.")
    assert ids.count(tok.mask_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Paris is the  of France."


def test_save_load_keeps_specials(tok, tmp_path):
    path = tok.save(tmp_path / "out")
    assert path == tmp_path / "out" / "tokenizer.json"
    for where in (path, path.parent):
        loaded = GLMTokenizer.load(where)
        assert loaded.special_ids == tok.special_ids
        assert loaded.vocab_size == tok.vocab_size
        text = "神说：要有光 [MASK] light <eos>"
        assert loaded.encode(text) == tok.encode(text)
    assert GLMTokenizer.load(tok.save(tmp_path / "named.json")).vocab_size == tok.vocab_size


# --- the shipped tokenizer -----------------------------------------------------------------------


def test_shipped_vocab_size(tok):
    assert tok.vocab_size == 16384 == len(tok)


def test_compression_on_corpus(tok):
    zh = [d.text for d in itertools.islice(iter_documents(("zh_cuv",)), 5)]
    zh += [d.text for d in itertools.islice(iter_documents(("zh_classics",)), 20)]
    en = [d.text for d in itertools.islice(iter_documents(("en_kjv",)), 5)]
    for texts, limit in ((zh, 0.6), (en, 0.4)):
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(map(len, tok.encode_batch(texts)))
        assert n_tokens / n_bytes < limit


# --- errors --------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        GLMTokenizer.load(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="not found"):
        GLMTokenizer.load(tmp_path)  # a folder without tokenizer.json


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"version": "1.0", "model": ', "not valid JSON"),
        ('{"hello": 1}', "not a tokenizer file"),
        ("\x00\x01garbage", "not valid JSON"),
    ],
)
def test_corrupt_file(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=message):
        GLMTokenizer.load(path)


def test_file_without_glm_specials(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    path.write_text(Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).to_str())
    with pytest.raises(TokenizerError, match="special token <pad>"):
        GLMTokenizer.load(path)


def test_bad_inputs(tok):
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([-1])


# --- training ------------------------------------------------------------------------------------


def test_train_tiny():
    texts = ["the cat sat on the mat", "the dog sat on the log", "猫坐在垫子上", "狗坐在木头上"] * 3
    t = train_tokenizer(texts, vocab_size=300, min_frequency=2)
    assert [t.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(8))
    assert t.vocab_size <= 300
    assert t.token_to_id("Ġthe") is not None  # a merge was learned
    assert t.encode("[MASK]") == [t.mask_id]
    for s in texts + ["unseen 文字 ✨"]:
        assert t.decode(t.encode(s)) == s


def test_train_too_small_vocab():
    with pytest.raises(TokenizerError, match="at least"):
        train_tokenizer(["abc"], vocab_size=100)


# --- official SentencePiece vocabularies ---------------------------------------------------------

_TEXT = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    """Two tiny SentencePiece models (400 pieces) shaped like icetk's and ChatGLM-6B's ice_text.model."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(doc.text for doc in itertools.islice(iter_documents(("en_kjv",)), 10)))
    common = dict(input=str(corpus), vocab_size=400, model_type="bpe", minloglevel=2)
    # icetk: the default layout, <unk>=0 <s>=1 </s>=2; GLM's specials are not pieces
    spm.SentencePieceTrainer.train(model_prefix=str(d / "icetk"), **common)
    # ChatGLM-6B: <pad> piece, specials and whitespace pieces are part of the model
    spm.SentencePieceTrainer.train(
        model_prefix=str(d / "chatglm"),
        pad_id=3,
        control_symbols=["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>"],
        user_defined_symbols=["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)],
        **common,
    )
    return spm, d / "icetk.model", d / "chatglm.model"


def test_sentencepiece_glm130b_convention(sp_models):
    spm, icetk_file, _ = sp_models
    sp = spm.SentencePieceProcessor(model_file=str(icetk_file))
    assert sp.get_piece_size() == 400
    t = GLMTokenizer.from_sentencepiece(icetk_file, convention="glm-130b")
    assert isinstance(t, GLMTokenizer)
    # text pieces are shifted past icetk's 20000 image tokens
    assert t.encode(_TEXT) == [20000 + i for i in sp.encode(_TEXT)]
    assert all(20000 <= i < 20400 for i in t.encode(_TEXT))
    assert (t.mask_id, t.gmask_id, t.smask_id, t.sop_id, t.eop_id) == (150000, 150001, 150002, 150004, 150005)
    assert (t.eos_id, t.unk_id, t.pad_id) == (20002, 20000, 0)
    assert t.vocab_size == 150008
    assert t.decode(t.encode(_TEXT)) == _TEXT
    ids = t.encode("Paris is the [MASK] of France.")
    assert ids.count(150000) == 1
    assert "[MASK]" in t.decode(ids)
    assert "[MASK]" not in t.decode(ids, skip_special_tokens=True)
    assert t.token_to_id("[gMASK]") == 150001
    assert t.id_to_token(20000 + sp.piece_to_id("▁the")) == "▁the"
    assert t.id_to_token(5) is None
    with pytest.raises(TokenizerError, match="not a text token"):
        t.decode([5])  # an icetk image token
    # saved into a model folder as tokenizer.model + its convention, and loaded back
    folder = t.model_file.parent / "saved"
    t.save(folder / "tokenizer.json")
    back = SentencePieceTokenizer.load_folder(folder)
    assert back.convention == "glm-130b" and back.encode("the [MASK] of") == t.encode("the [MASK] of")


def test_sentencepiece_chatglm6b_convention(sp_models):
    spm, _, chatglm_file = sp_models
    sp = spm.SentencePieceProcessor(model_file=str(chatglm_file))
    t = GLMTokenizer.from_sentencepiece(chatglm_file, convention="chatglm-6b")
    # no image offset: the special ids are those of the pieces in the file
    for name in ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<pad>"]:
        assert t.token_to_id(name) == sp.piece_to_id(name)
    assert (t.pad_id, t.unk_id, t.eos_id) == (3, sp.unk_id(), sp.piece_to_id("</s>"))
    assert t.vocab_size == 400
    assert t.encode(_TEXT) == sp.encode(_TEXT)
    # ChatGLM's whitespace pieces: newline, tab and runs of spaces survive the round trip
    text = "In the beginning\nGod  created\tthe heaven."
    ids = t.encode(text)
    assert sp.piece_to_id("<n>") in ids and sp.piece_to_id("<|blank_2|>") in ids
    assert t.decode(ids) == text
    ids = t.encode("the [gMASK] earth<sop>")
    assert ids.count(t.gmask_id) == 1 and t.sop_id not in ids  # a typed "<sop>" stays text
    assert t.encode("the [gMASK] earth<sop>", special_tokens=True)[-1] == t.sop_id


def test_sentencepiece_errors(sp_models, tmp_path, monkeypatch):
    _, icetk_file, _ = sp_models
    with pytest.raises(TokenizerError, match="pieces missing"):
        GLMTokenizer.from_sentencepiece(icetk_file, convention="chatglm-6b")
    with pytest.raises(TokenizerError, match="unknown convention"):
        GLMTokenizer.from_sentencepiece(icetk_file, convention="gpt-2")
    with pytest.raises(TokenizerError, match="not found"):
        GLMTokenizer.from_sentencepiece(tmp_path / "ice_text.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        SentencePieceTokenizer(bad)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    with pytest.raises(TokenizerError, match="install sentencepiece"):
        GLMTokenizer.from_sentencepiece(icetk_file)


def test_typed_special_strings_stay_text_except_blanks():
    """As GLM-130B's generate.py: only [MASK]/[sMASK]/[gMASK] in a text are special; a user who
    types "<eos>" or "<sop>" gets those characters, not control tokens."""
    t = default_tokenizer()
    text = "a <eos> b <sop> c [MASK] d [sMASK] e [gMASK]"
    ids = t.encode(text)
    assert [i for i in ids if i < 8] == [t.mask_id, t.smask_id, t.gmask_id]
    assert t.decode(ids) == text
    assert t.eos_id in t.encode(text, special_tokens=True)
    assert t.encode_batch([text, "x"]) == [ids, t.encode("x")]


def test_icetk_newlines_and_chatglm_v1_offsets(sp_models, tmp_path):
    """icetk (GLM-130B): a newline is the "<n>" piece both ways. ChatGLM-6B v1.0 (150,528 ids):
    num_image_tokens shifts every id by 20000."""
    spm, icetk_file, chatglm_file = sp_models
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(doc.text for doc in itertools.islice(iter_documents(("en_kjv",)), 10)))
    spm.SentencePieceTrainer.train(input=str(corpus), vocab_size=400, model_type="bpe", minloglevel=2,
                                   model_prefix=str(tmp_path / "ice"), user_defined_symbols=["<n>"])
    ice = GLMTokenizer.from_sentencepiece(tmp_path / "ice.model", convention="glm-130b")
    ids = ice.encode("In the beginning\nGod")
    assert ice.token_to_id("<n>") in ids and ice.decode(ids) == "In the beginning\nGod"
    plain = GLMTokenizer.from_sentencepiece(icetk_file, convention="glm-130b")  # no "<n>" piece: as before
    assert plain.encode("a\nb") == [20000 + i for i in spm.SentencePieceProcessor(model_file=str(icetk_file)).encode("a\nb")]
    v1 = GLMTokenizer.from_sentencepiece(chatglm_file, convention="chatglm-6b", num_image_tokens=20000)
    v11 = GLMTokenizer.from_sentencepiece(chatglm_file, convention="chatglm-6b")
    text = "the [gMASK] earth\nand"
    assert v1.encode(text) == [i + 20000 for i in v11.encode(text)]
    assert v1.mask_id == v11.mask_id + 20000 and v1.decode(v1.encode(text)) == v11.decode(v11.encode(text))
