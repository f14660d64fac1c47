"""A byte-level character tokenizer with CLIP's conventions, for tiny test models.

It uses CLIP's normaliser, pre-tokeniser, `</w>` end-of-word suffix and `<|startoftext|> ...
<|endoftext|>` framing, but a 514-token vocabulary (256 byte characters, the same with `</w>`, then
BOS and EOS) and no merges, so each character is one token. No files are read or written, and the
object pickles (DataLoader workers). EOS is the highest id, as in CLIP, so a text model that pools at
`input_ids.argmax(-1)` pools at the first EOS.
"""

from __future__ import annotations

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation pattern (transformers' CLIPTokenizer).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def char_vocab() -> dict[str, int]:
    """Token -> id: bytes 0..255, bytes + '</w>' 256..511, BOS 512, EOS 513."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256 byte-level characters
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab[BOS], vocab[EOS] = 2 * len(chars), 2 * len(chars) + 1
    return vocab


def build_char_tokenizer(max_length: int = 77) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer with `model_max_length=max_length`; `len(tok) == 514`."""
    vocab = char_vocab()
    tok = Tokenizer(BPE(vocab=vocab, merges=[], continuing_subword_prefix="", end_of_word_suffix="</w>",
                        unk_token=EOS, fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " "),
                                     decoders.Strip(" ", 0, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=max_length)
