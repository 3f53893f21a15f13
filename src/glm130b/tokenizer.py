"""The bilingual (English + Chinese) tokenizer.

Our own tokenizer is a byte-level BPE built on Hugging Face `tokenizers`:
- The ByteLevel pre-tokenizer first maps every UTF-8 byte to one of 256 printable characters, and
  the ByteLevel decoder maps them back. All 256 bytes are in the base vocabulary, so there is no
  unknown token in practice: a character the merges never saw (a rare CJK ideograph, an emoji)
  falls back to its UTF-8 bytes. That is our "byte fallback", and it is why
  `decode(encode(s)) == s` holds for ANY Unicode string.
- There is no normalizer (no NFKC, no lower-casing, no whitespace stripping): the round trip is exact.
- The eight special tokens sit at ids 0..7, in the order of SPECIAL_TOKENS, and are stored in the
  tokenizer file. Of their strings typed in a text, only the blanks ("[MASK]", "[sMASK]",
  "[gMASK]") become their ids, as GLM-130B's generate.py splits only on them; "<eos>", "<sop>"
  and the others stay text (a user cannot end or open a block by typing them) unless
  `encode(text, special_tokens=True)` asks for all eight.

`GLMTokenizer.from_sentencepiece` wraps the official SentencePiece file (`ice_text.model`) of
GLM-130B (icetk) or ChatGLM-6B behind the same interface; see SentencePieceTokenizer for the
id convention of each.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from glm130b.errors import GLMError, first_line
from glm130b.io import atomic_write_text

SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<sop>", "<eop>", "[MASK]", "[gMASK]", "[sMASK]"]
BLANK_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]")  # the specials a user's text may contain
_BLANK_RE = re.compile("(" + "|".join(re.escape(t) for t in BLANK_TOKENS) + ")")
_SPECIAL_ATTRS = ["pad_id", "unk_id", "eos_id", "sop_id", "eop_id", "mask_id", "gmask_id", "smask_id"]
TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"  # an official ice_text.model, copied into a model folder
SENTENCEPIECE_CONFIG = "tokenizer_config.json"


class TokenizerError(GLMError, ValueError):
    """A tokenizer file is missing or corrupt, or a tokenizer was asked for something it cannot do."""


class GLMTokenizer:
    """Byte-level BPE tokenizer with GLM's special tokens at ids 0..7."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        for i, (name, attr) in enumerate(zip(SPECIAL_TOKENS, _SPECIAL_ATTRS, strict=True)):
            if tokenizer.token_to_id(name) != i:
                raise TokenizerError(f"special token {name} must have id {i}, has {tokenizer.token_to_id(name)}")
            setattr(self, attr, i)
        # a twin that reads every special-token string as text (the blanks are split off first)
        self._text_only = Tokenizer.from_str(tokenizer.to_str())
        self._text_only.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the embedding table needs this many rows."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        return {name: getattr(self, attr) for name, attr in zip(SPECIAL_TOKENS, _SPECIAL_ATTRS, strict=True)}

    def encode(self, text: str, special_tokens: bool = False, blanks: bool = True) -> list[int]:
        """Token ids of `text`; nothing (no BOS/EOS) is added. Blank strings become their ids
        (not with `blanks=False`: a chat message); other special-token strings only with
        `special_tokens`."""
        return self.encode_batch([text], special_tokens, blanks)[0]

    def encode_batch(self, texts: Iterable[str], special_tokens: bool = False, blanks: bool = True) -> list[list[int]]:
        texts = list(texts)
        for t in texts:
            _check_text(t)
        try:
            if special_tokens:
                return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
            if not blanks:
                return [e.ids for e in self._text_only.encode_batch(texts, add_special_tokens=False)]
            parts = [_BLANK_RE.split(t) for t in texts]
            pieces = [p for ps in parts for p in ps if p and p not in BLANK_TOKENS]
            encoded = iter(self._text_only.encode_batch(pieces, add_special_tokens=False))
            return [[i for p in ps if p for i in ([self.special_ids[p]] if p in BLANK_TOKENS else next(encoded).ids)]
                    for ps in parts]
        except TypeError:
            raise TokenizerError("text is not valid Unicode (it holds a lone surrogate)") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = _check_ids(ids, self.vocab_size)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(int(id))

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer JSON atomically; a path without a .json suffix is a folder."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / TOKENIZER_FILE
        atomic_write_text(path, self._tok.to_str())
        return path

    @classmethod
    def load(cls, path: str | Path) -> GLMTokenizer:
        """Load a tokenizer.json (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
        return cls._from_json(text, str(path))

    @classmethod
    def _from_json(cls, text: str, where: str) -> GLMTokenizer:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{where}: not a tokenizer file ({first_line(e)})") from None
        try:
            return cls(tok)
        except TokenizerError as e:
            raise TokenizerError(f"{where}: {e}") from None

    @classmethod
    def from_sentencepiece(cls, model_file: str | Path, convention: str = "glm-130b",
                           num_image_tokens: int = 0) -> SentencePieceTokenizer:
        """Wrap an official `ice_text.model`; convention is "glm-130b" (icetk) or "chatglm-6b"
        (`num_image_tokens` 20000 for ChatGLM-6B v1.0)."""
        return SentencePieceTokenizer(model_file, convention, num_image_tokens)


class SentencePieceTokenizer(GLMTokenizer):
    """GLM's official SentencePiece vocabularies behind the GLMTokenizer interface.

    convention="glm-130b" (the icetk `ice_text.model` used by GLM-130B):
      icetk puts 20000 image tokens first, so a text piece with SentencePiece id i has GLM id 20000 + i
      (icetk/ice_tokenizer.py: `num_image_tokens = 20000`, `encode` adds it, `decode` subtracts it;
      icetk README: ids [20000, 150000) are text, icetk[20000] == '<unk>', icetk[20003] == '<pad>').
      The GLM special tokens are not SentencePiece pieces; they come after the 150000 ids
      (SwissArmyTransformer tokenization/icetk_glm_130B/ice_tokenizer.py: num_tokens = 150000 and
      add_special_tokens(['[MASK]', '[gMASK]', '[sMASK]', 'eod', 'sop', 'eop', 'ENC', 'dBLOCK'])):
        [MASK]=150000 [gMASK]=150001 [sMASK]=150002 (eod=150003) <sop>=150004 <eop>=150005
      <eos> is the piece '</s>' = 20002 (same file: `special_tokens['eos'] = 20002`), <unk> = 20000
      (the '<unk>' piece) and <pad> = 0 (SAT maps id 0 to '[pad]'; GLM-130B evaluation/dataset.py pads
      with 0). vocab_size = 150008, as in SAT (`num_tokens + len(special_tokens)`); the released model
      pads its embedding to 150528.
      Text preprocessing as icetk's: "\n" -> "<n>" when encoding, "<n>" -> "\n" when decoding.

    convention="chatglm-6b" (the current ChatGLM-6B `ice_text.model`, v1.1 and later):
      The 20000 image tokens were removed from that file (THUDM/ChatGLM-6B issue #965 and PR #401:
      "the latest model has removed the image tokens"; issue #987: num_image_tokens must be 0), so
      SentencePiece ids ARE the GLM ids, and the special tokens are pieces of the file itself:
        [MASK]=130000 [gMASK]=130001 [sMASK]=130002 <sop>=130004 <eop>=130005 <pad>=3, '</s>'=2
      (config.json of THUDM/chatglm-6b: mask 130000, gmask 130001, bos 130004, eos 130005, pad 3;
      chatglm.cpp looks them up with sp.PieceToId("[MASK]") etc.). Here they are looked up by piece
      name too, <eos> being the '</s>' piece. vocab_size is the number of pieces (130344).
      Text is preprocessed as tokenization_chatglm.py does: "\\n" -> "<n>", "\\t" -> "<|tab|>",
      runs of 2..80 spaces -> "<|blank_N|>"; decode undoes it.
      The first ChatGLM-6B release (v1.0, vocabulary 150528) kept the 20000 image tokens in its
      file: `num_image_tokens=20000` (its tokenizer_config.json) shifts every id by 20000, so
      [MASK]=150000 and <sop>=150004 there, with ChatGLM's text preprocessing.

    In both, the blank strings ("[MASK]", "[sMASK]", "[gMASK]") in the text are split off and
    encoded as their ids, and each piece of text between them is encoded separately, as
    GLM-130B's generate.py does (other special-token strings stay text unless
    `special_tokens=True`). As there, SentencePiece's own normalization applies, so the round
    trip is not exact: spaces next to a special token, and repeated spaces (glm-130b), are lost.
    """

    CONVENTIONS = ("glm-130b", "chatglm-6b")
    _ICETK_IMAGE_TOKENS = 20000
    _ICETK_SPECIALS = {"[MASK]": 150000, "[gMASK]": 150001, "[sMASK]": 150002, "<sop>": 150004, "<eop>": 150005}
    _ICETK_VOCAB = 150008
    _MAX_BLANK = 80

    def __init__(self, model_file: str | Path, convention: str = "glm-130b", num_image_tokens: int = 0):
        if convention not in self.CONVENTIONS:
            raise TokenizerError(f"unknown convention {convention!r}; choose one of {', '.join(self.CONVENTIONS)}")
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError("install sentencepiece to load .model files: pip install sentencepiece") from None
        model_file = Path(model_file)
        if not model_file.is_file():
            raise TokenizerError(f"SentencePiece model not found: {model_file}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_file}: not a SentencePiece model ({first_line(e)})") from None
        self._sp = sp
        self.convention = convention
        self.model_file = model_file
        self._n_pieces = sp.get_piece_size()

        if convention == "glm-130b":
            self._offset = self._ICETK_IMAGE_TOKENS
            if self._offset + self._n_pieces > min(self._ICETK_SPECIALS.values()):
                raise TokenizerError(f"{model_file}: {self._n_pieces} pieces overlap GLM-130B's special ids")
            if sp.unk_id() < 0 or sp.eos_id() < 0:
                raise TokenizerError(f"{model_file}: the model has no <unk> or </s> piece")
            ids = dict(self._ICETK_SPECIALS)
            ids["<pad>"] = 0
            ids["<unk>"] = self._offset + sp.unk_id()
            ids["<eos>"] = self._offset + sp.eos_id()
            self._vocab_size = self._ICETK_VOCAB
        else:
            self._offset = num_image_tokens  # 0, or 20000 for ChatGLM-6B v1.0
            pieces = {"<pad>": "<pad>", "<unk>": sp.id_to_piece(sp.unk_id()), "<eos>": "</s>"}
            ids, missing = {}, []
            for name in SPECIAL_TOKENS:
                piece = pieces.get(name, name)
                i = sp.piece_to_id(piece)
                if sp.id_to_piece(i) != piece:
                    missing.append(piece)
                ids[name] = self._offset + i
            if missing:
                raise TokenizerError(f"{model_file}: not a ChatGLM-6B vocabulary, pieces missing: {' '.join(missing)}")
            self._vocab_size = self._offset + self._n_pieces
        self.num_image_tokens = self._offset if convention == "chatglm-6b" else 0

        for name, attr in zip(SPECIAL_TOKENS, _SPECIAL_ATTRS, strict=True):
            setattr(self, attr, ids[name])
        self._special_to_name = {i: name for name, i in ids.items()}
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self._linebreak = sp.id_to_piece(sp.piece_to_id("<n>")) == "<n>"  # icetk's newline piece

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _is_text_id(self, i: int) -> bool:
        return self._offset <= i < self._offset + self._n_pieces

    def _preprocess(self, text: str) -> str:
        if self.convention != "chatglm-6b":
            return text.replace("\n", "<n>") if self._linebreak else text
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return re.sub(f" {{2,{self._MAX_BLANK}}}", lambda m: f"<|blank_{len(m.group())}|>", text)

    def _postprocess(self, text: str) -> str:
        if self.convention != "chatglm-6b":
            return text.replace("<n>", "\n")
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)

    def encode(self, text: str, special_tokens: bool = False, blanks: bool = True) -> list[int]:
        _check_text(text)
        out: list[int] = []
        special = set(SPECIAL_TOKENS) if special_tokens else set(BLANK_TOKENS) if blanks else set()
        parts = (self._split_re if special_tokens else _BLANK_RE).split(text) if special else [text]
        for part in parts:
            if not part:
                continue
            if part in special:
                out.append(self.special_ids[part])
            else:
                out.extend(self._offset + i for i in self._sp.encode(self._preprocess(part)))
        return out

    def encode_batch(self, texts: Iterable[str], special_tokens: bool = False, blanks: bool = True) -> list[list[int]]:
        return [self.encode(t, special_tokens, blanks) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = _check_ids(ids, self.vocab_size)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_to_name:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._special_to_name[i])
            elif self._is_text_id(i):
                run.append(i - self._offset)
            else:
                raise TokenizerError(f"token id {i} is not a text token of this vocabulary (an image token?)")
        if run:
            parts.append(self._sp.decode(run))
        return self._postprocess("".join(parts))

    def token_to_id(self, token: str) -> int | None:
        if token in SPECIAL_TOKENS:
            return self.special_ids[token]
        i = self._sp.piece_to_id(token)
        return self._offset + i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, id: int) -> str | None:
        id = int(id)
        if id in self._special_to_name:
            return self._special_to_name[id]
        return self._sp.id_to_piece(id - self._offset) if self._is_text_id(id) else None

    def save(self, path: str | Path) -> Path:
        """Copy the .model file into a model folder as `tokenizer.model`, with its convention in
        `tokenizer_config.json` (a path ending in .json means its folder)."""
        import shutil

        folder = Path(path).parent if Path(path).suffix == ".json" else Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / SENTENCEPIECE_FILE
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(self.model_file, tmp)
        tmp.replace(target)
        config = {"type": "sentencepiece", "convention": self.convention, "num_image_tokens": self.num_image_tokens}
        if self.convention == "chatglm-6b":  # the Hugging Face place for it (glm130b.infer.chat)
            from glm130b.infer.chat import CHATGLM6B

            config["chat_template"] = CHATGLM6B
        atomic_write_text(folder / SENTENCEPIECE_CONFIG, json.dumps(config, ensure_ascii=False) + "\n")
        return target

    @classmethod
    def load_folder(cls, folder: str | Path) -> SentencePieceTokenizer:
        """The tokenizer `save` put in a model folder."""
        folder = Path(folder)
        try:
            config = json.loads((folder / SENTENCEPIECE_CONFIG).read_text())
            convention, image_tokens = config["convention"], int(config.get("num_image_tokens", 0))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"{folder / SENTENCEPIECE_CONFIG}: unreadable ({first_line(e)})") from None
        return cls(folder / SENTENCEPIECE_FILE, convention, image_tokens)



def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"encode expects a str, got {type(text).__name__}")


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    out = [int(i) for i in ids]
    for i in out:
        if not 0 <= i < vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (0..{vocab_size - 1})")
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> GLMTokenizer:
    """Train a byte-level BPE on `texts`; the special tokens get ids 0..7, then the 256 byte symbols."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise TokenizerError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return GLMTokenizer(tok)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> GLMTokenizer:
    """The shipped 16384-token tokenizer (trained by tools/train_tokenizer.py); one shared instance."""
    resource = resources.files("glm130b") / "assets" / TOKENIZER_FILE
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"shipped tokenizer missing: {resource} (run tools/train_tokenizer.py)") from None
    return GLMTokenizer._from_json(text, str(resource))
