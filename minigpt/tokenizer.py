"""Text to token ids and back.

Two tokenizers behind one interface, both stored as a standard Hugging Face `tokenizer.json`
(loadable with `tokenizers.Tokenizer.from_file` and no MiniGPT code):

    BPETokenizer    byte-level BPE. Text is first turned into UTF-8 bytes, so any string can be
                    encoded with no unknown token; training then merges the most frequent
                    adjacent pairs into new tokens until the vocabulary is full. Round trips are
                    exact for any text.
    CharTokenizer   one token per character seen in training: the classic tiny-Shakespeare
                    setup, and the easiest tokenizer to reason about while learning. A character
                    not seen in training becomes <|unk|>, so round trips are exact only for
                    text made of seen characters.

Ids 0-3 are always the special tokens below, so code can rely on them. Special tokens written
literally in a text (say "<|endoftext|>" inside a document) are encoded as the special token.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HuggingFaceTokenizer
from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

from minigpt.errors import UserInputError
from minigpt.files import atomic_write_bytes

EOS_TOKEN = "<|endoftext|>"  # ends a document; also where generation starts a new one
IM_START_TOKEN = "<|im_start|>"  # opens a chat turn: <|im_start|>role\ncontent<|im_end|>\n
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN]
UNKNOWN_TOKEN = "<|unk|>"  # character tokenizer only: a character not seen in training (id 4)
CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer:
    """What both kinds share: encode, decode, chat rendering, save. Wraps a `tokenizers.Tokenizer`."""

    kind: str  # "bpe" or "char", set by each subclass

    def __init__(self, backend: HuggingFaceTokenizer):
        self.backend = backend
        ids = [backend.token_to_id(token) for token in SPECIAL_TOKENS]
        if ids != [0, 1, 2, 3]:
            raise UserInputError(
                f"This tokenizer lacks MiniGPT's special tokens {SPECIAL_TOKENS} at ids 0-3; "
                "train one with scripts/train_tokenizer.py."
            )
        self.eos_id, self.im_start_id, self.im_end_id, self.pad_id = ids

    @property
    def vocab_size(self) -> int:
        """How many token ids there are, special tokens included: the model's embedding rows."""
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`, with no special tokens added around it."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """The token ids of `text` read as plain text: a special token written in it ("<|im_end|>",
        say) is encoded as its characters, never as the special token. What users type goes
        through here, so a message cannot end its own turn or open another one."""
        if not hasattr(self, "_text_backend"):  # a second backend: the switch is not flipped under other threads
            self._text_backend = HuggingFaceTokenizer.from_str(self.backend.to_str())
            self._text_backend.encode_special_tokens = True
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel inside `tokenizers`): the fast path for data."""
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens included, so decode(encode(text)) == text."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """How many UTF-8 bytes of text each token id stands for (0 for special tokens).

        Dividing a loss by bytes rather than tokens gives bits per byte, which compares models
        with different tokenizers fairly.
        """
        lengths = [0] * self.vocab_size
        for token, index in self.backend.get_vocab(with_added_tokens=True).items():
            if token not in SPECIAL_TOKENS:
                lengths[index] = self._byte_length(token)
        return lengths

    def _byte_length(self, token: str) -> int:
        raise NotImplementedError  # each kind writes its tokens differently

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically: a reader sees the old file or the new one, never half."""
        atomic_write_bytes(path, self.backend.to_str(pretty=True).encode("utf-8"))

    def render_chat(self, conversations: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation, and a mask that is True on what the assistant says.

        Each turn is `<|im_start|>role\\ncontent<|im_end|>\\n`. The mask covers the assistant's
        content and its closing <|im_end|> (so the model learns to stop), and nothing else: in
        chat fine-tuning the loss is computed only where the mask is True. The contents are plain
        text (`encode_text`): only the template places special tokens.
        """
        ids: list[int] = []
        mask: list[bool] = []
        newline = self.encode("\n")
        for turn in conversations:
            role, content = _check_turn(turn)
            header = [self.im_start_id] + self.encode(f"{role}\n")
            body = self.encode_text(content) + [self.im_end_id]
            ids += header + body + newline
            mask += [False] * len(header) + [role == "assistant"] * len(body) + [False] * len(newline)
        return ids, mask

    def chat_prompt(self, conversations: list[dict]) -> list[int]:
        """The conversation so far, followed by the header of the assistant's reply, for generation."""
        ids, _ = self.render_chat(conversations)
        return ids + [self.im_start_id] + self.encode("assistant\n")

    def stop_ids(self, chat: bool) -> tuple[int, ...]:
        """The token ids that end a generation: the one place that decides them.

        Plain text ends at <|endoftext|> (the document is over). A chat reply ends at <|im_end|>
        (the assistant's turn is over), or at <|endoftext|> should the model write that instead.
        """
        return (self.im_end_id, self.eos_id) if chat else (self.eos_id,)

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


class BPETokenizer(Tokenizer):
    """Byte-level BPE: any text encodes, and decodes back exactly."""

    kind = "bpe"

    def _byte_length(self, token: str) -> int:
        # Byte-level BPE writes each byte of a token as one printable character ("Ġ" is a space).
        return len(token)


class CharTokenizer(Tokenizer):
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


def _check_turn(turn: object) -> tuple[str, str]:
    if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES or not isinstance(turn.get("content"), str):
        raise UserInputError(
            f"A chat turn must be an object with 'role' ({', '.join(CHAT_ROLES)}) and string 'content', got {str(turn)[:80]}."
        )
    return turn["role"], turn["content"]


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
    """Load a tokenizer.json written by MiniGPT: BPE models are byte-level BPE, WordLevel ones characters."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"Tokenizer file {path} does not exist; train one with scripts/train_tokenizer.py.")
    try:
        backend = HuggingFaceTokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception for bad files
        reason = str(error).splitlines()[0]
        raise UserInputError(f"Tokenizer file {path} could not be read ({reason}); train it again.") from None
    model_type = json.loads(backend.to_str())["model"]["type"]
    kinds = {"BPE": BPETokenizer, "WordLevel": CharTokenizer}
    if model_type not in kinds:
        raise UserInputError(
            f"Tokenizer file {path} holds a {model_type} model; MiniGPT reads byte-level BPE or character tokenizers."
        )
    return kinds[model_type](backend)
