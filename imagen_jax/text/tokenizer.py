"""Caption tokenizer: Hugging Face tokenizers (transformers v5) -> fixed-length ids + mask."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import transformers

log = logging.getLogger(__name__)

BYTE_TOKENIZER = 'byt5'  # offline byte-level tokenizer (UTF-8 bytes + 3), no files needed
MAX_LOGGED_TRUNCATIONS = 50  # per tokenizer at WARNING; later ones at DEBUG (still counted)


class Tokenizer:
  """Pads / truncates captions to `max_length` tokens (EOS kept) and logs what it drops."""

  def __init__(self, hf_tokenizer, *, max_length: int = 128, name: str = ''):
    if max_length < 2:
      raise ValueError(f'max_length must be >= 2 (a token and EOS), got {max_length}.')
    if hf_tokenizer.pad_token_id is None:
      raise ValueError(
        f'Tokenizer {name!r} has no pad token; T5 tokenizers pad with id 0. Use a T5 tokenizer.'
      )
    hf_tokenizer.padding_side = 'right'  # T5 masks are a prefix of real tokens
    hf_tokenizer.truncation_side = 'right'
    self.hf_tokenizer = hf_tokenizer
    self.max_length = max_length
    self.name = name or type(hf_tokenizer).__name__
    self.num_truncated = 0  # captions truncated so far
    self.num_dropped_tokens = 0

  @property
  def vocab_size(self) -> int:
    return len(self.hf_tokenizer)

  @property
  def pad_id(self) -> int:
    return int(self.hf_tokenizer.pad_token_id)

  def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """captions -> ids [B, L] int32 (pad id after the text), mask [B, L] bool; L = max_length."""
    if isinstance(captions, str):
      raise TypeError('Pass a sequence of captions, not a single string: tokenizer([caption]).')
    captions = list(captions)
    if not captions:
      return np.zeros((0, self.max_length), np.int32), np.zeros((0, self.max_length), bool)
    encoded = self.hf_tokenizer(
      captions,
      max_length=self.max_length,
      padding='max_length',
      truncation=True,
      return_attention_mask=True,
    )
    ids = np.asarray(encoded['input_ids'], np.int32)  # [B, L]
    mask = np.asarray(encoded['attention_mask'], bool)  # [B, L]
    full = mask.all(axis=1)
    if full.any():  # only full rows may have been truncated: count their untruncated length
      idx = np.flatnonzero(full)
      untruncated = self.hf_tokenizer([captions[i] for i in idx], truncation=False)['input_ids']
      for i, toks in zip(idx, untruncated, strict=True):
        dropped = len(toks) - self.max_length
        if dropped > 0:
          self.num_truncated += 1
          self.num_dropped_tokens += dropped
          level = logging.WARNING if self.num_truncated <= MAX_LOGGED_TRUNCATIONS else logging.DEBUG
          log.log(
            level,
            'Caption truncated to max_length=%d tokens, %d of %d tokens dropped: %r',
            self.max_length,
            dropped,
            len(toks),
            captions[i][:200],
          )
          if self.num_truncated == MAX_LOGGED_TRUNCATIONS:
            log.warning('Further truncations are logged at DEBUG level (and counted).')
    return ids, mask


def load_tokenizer(name_or_path: str, *, max_length: int = 128) -> Tokenizer:
  """A tokenizer from a checkpoint folder / hub name, or 'byt5' for the offline byte tokenizer.

  T5 sentencepiece tokenizers load with `legacy=False` so the slow and fast variants agree;
  a folder with only `spiece.model` is converted through sentencepiece + protobuf.
  """
  if name_or_path == BYTE_TOKENIZER:
    return Tokenizer(transformers.ByT5Tokenizer(), max_length=max_length, name=BYTE_TOKENIZER)
  try:
    hf = transformers.AutoTokenizer.from_pretrained(os.fspath(name_or_path), legacy=False)
  except Exception as e:
    raise ValueError(
      f'Could not load a tokenizer from {str(name_or_path)!r} ({type(e).__name__}: {e}). '
      'A T5 checkpoint folder needs tokenizer.json or spiece.model (+ tokenizer_config.json); '
      'copy them from the original model repository.'
    ) from e
  return Tokenizer(hf, max_length=max_length, name=str(name_or_path))
