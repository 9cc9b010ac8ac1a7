"""In-repo tokenizer of the tiny model: characters + byte fallback + whole-word added tokens.

The base model is a ``tokenizers`` BPE model without merges, i.e. one token per character, over printable
ASCII plus newline and tab, with byte fallback (``<0x00>`` .. ``<0xFF>``) so that any text round-trips
losslessly. On top of it come:

* Qwen2.5-VL's special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
  ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``), each a single id, so the stock
  ``Qwen2_5_VLProcessor`` finds and expands the image/video placeholders as for a real checkpoint;
* whole-word added tokens for the vocabulary of the synthetic tasks (colour and shape names, question words,
  JSON keys) and the integers 0..112 (pixel coordinates in a 112 x 112 frame). They make sequences several
  times shorter than pure characters (faster training and generation) and give the model one token per
  concept, which is what lets a model this small route "red" from the question to the image. They are
  ``single_word`` so that e.g. "is" never matches inside "this", and "12" never inside "112".

It is wrapped as a transformers ``TokenizersBackend`` (alias ``PreTrainedTokenizerFast``): that class loads
``tokenizer.json`` verbatim, whereas ``Qwen2Tokenizer`` would rebuild a byte-level BPE pipeline around the
vocabulary and break the character model.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from ..data.scenes import COLOURS, DIRECTIONS, IMAGE_SIZE, SHAPE_PLURALS, SHAPES

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Characters of the base model: printable ASCII (space .. ~) plus newline and tab.
BASE_CHARS: tuple[str, ...] = tuple(string.printable[:95]) + ("\n", "\t")
assert len(set(BASE_CHARS)) == len(BASE_CHARS) == 97

# Words of the synthetic task templates (mmprune_exp.data.scenes) that become single tokens.
TASK_WORDS: tuple[str, ...] = (
    *COLOURS,
    *SHAPES,
    *SHAPE_PLURALS.values(),
    *DIRECTIONS,
    "shape", "shapes", "object", "How", "many", "are", "there", "What", "colour", "is", "the", "Is",
    "to", "of", "above", "below", "yes", "no", "Answer", "with", "letter", "Locate", "every", "in",
    "image", "and", "output", "bbox", "coordinates", "JSON", "format", "bbox_2d", "label", "json",
    "Which", "direction", "does", "move", "or", "moves", "stay", "still",
    # chat-template role names
    "system", "user", "assistant",
)  # fmt: skip
NUMBER_WORDS: tuple[str, ...] = tuple(str(i) for i in range(IMAGE_SIZE + 1))
# Punctuation runs of Qwen2.5-VL's grounding JSON, one token each (a real BPE vocabulary has such merges).
# A box line then takes ~15 tokens instead of ~32, which halves grounding sequence length and decode time.
BOX_OPEN = '{"bbox_2d": ['
BOX_LABEL = '], "label": "'
BOX_CLOSE = '"}'
COMMA = ", "
# Non-word added tokens (not single_word: they are punctuation anyway).
SYMBOL_TOKENS: tuple[str, ...] = ("```", BOX_OPEN, BOX_LABEL, BOX_CLOSE, COMMA)


def _dedupe(items) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def build_backend() -> Tokenizer:
    """The raw ``tokenizers.Tokenizer`` (deterministic: the id layout depends only on the constants above)."""
    vocab: dict[str, int] = {}
    for ch in BASE_CHARS:
        vocab[ch] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    # No merges: every character is its own token. byte_fallback covers anything outside BASE_CHARS.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    # Fuse concatenates tokens without separators; ByteFallback first turns <0xNN> runs back into UTF-8.
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    words = _dedupe(w for w in TASK_WORDS + NUMBER_WORDS if w not in BASE_CHARS)
    tok.add_tokens([AddedToken(w, single_word=True, normalized=False, special=False) for w in words])
    tok.add_tokens([AddedToken(s, single_word=False, normalized=False, special=False) for s in SYMBOL_TOKENS])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIAL_TOKENS])
    return tok


def build_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The transformers tokenizer saved with the tiny checkpoint."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        bos_token=None,
        eos_token=IM_END,  # as in Qwen2.5-VL-Instruct: a chat turn ends with <|im_end|>
        pad_token=PAD_TOKEN,
        unk_token=None,
        # Batched generation needs left padding; the adapter sets it too, but this is the safe default.
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
