"""Prompts, scoring and calibration rows of the digits text-to-image evaluation.

One `score(...)` call turns a set of images and the classes their prompts named into one row
of metrics; the generated images and every calibration row go through it:

  real_test        the real test images (never trained on), prompted with their true labels:
                   the ceiling of adherence (= the judge's accuracy) and the real-vs-real
                   floor of FD; their nn_train is the natural distance of a new real image.
  shuffled_labels  the same images, labels permuted: realistic images that ignore the prompt
                   (adherence ~ chance, FD / precision / recall as real).
  class_means      the per-class mean of the train images, N/10 copies each: right class, no
                   diversity (recall ~ 0, large FD).
  noise            uniform colour noise in [-1, 1]: nothing learnt.

Reference set (FD, precision/recall, memorisation): the real *train* split, in the judge's
feature space (FD, P/R) and in pixel space (nn_train: RMS distance per value, images in
[-1, 1], to the nearest train image; ~0 means a copied training image). The train split is the
reference, not the test split, so that the real-test row measures a real-vs-real floor instead
of comparing the test set with itself (FD 0). FD and recall depend on the sample size (FD of
real test images vs the train split: ~19 at n=40, ~1.7 at n=359, 64-d features): compare rows
of similar n; the real rows use min(num, 359) images for that reason. `border` is the mean
grey level in [0, 1] of the R // 8-pixel frame, exactly 0 in every real image.
"""

import dataclasses
import string

import numpy as np

from imagen_jax.data import digits
from imagen_jax.evaluate import metrics
from imagen_jax.evaluate.judge import Judge

ROWS = ('generated', 'real_test', 'shuffled_labels', 'class_means', 'noise')
CALIBRATION_ROWS = ROWS[1:]
SCALARS = (
  'adherence',
  'adherence_seen',
  'adherence_heldout',
  'entropy_bits',
  'fd',
  'precision',
  'recall',
  'nn_train',
  'border',
)


class EvalError(ValueError):
  """Bad evaluation input; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class PromptSet:
  prompts: tuple[str, ...]
  labels: np.ndarray  # [N] int: the class each prompt names
  heldout: np.ndarray  # [N] bool: the prompt uses a held-out template
  templates: tuple[str, ...] = ()  # [N] the caption template of each prompt


def check_num(num: int) -> None:
  """EvalError unless num is a multiple of the class count with >= 2 prompts per class (one
  seen, one held-out template at least)."""
  if num < 2 * digits.NUM_CLASSES or num % digits.NUM_CLASSES:
    raise EvalError(
      f'--num must be a multiple of the {digits.NUM_CLASSES} classes and at least '
      f'{2 * digits.NUM_CLASSES} (class-balanced prompts, seen and held-out templates), got '
      f'{num}; e.g. --num {max(2, round(num / 10)) * 10}.'
    )


def check_templates(templates: tuple[str, ...] | list[str]) -> tuple[str, ...]:
  """`templates` as a tuple when each names the class with '{word}' ('seven') and/or
  '{numeral}' ('7') and no other field, and none repeats; EvalError naming the first bad one."""
  templates = tuple(templates)
  for i, t in enumerate(templates):
    if t in templates[:i]:
      raise EvalError(f'--template {t!r} is given twice; give each template once.')
    try:
      fields = {name for _, name, _, _ in string.Formatter().parse(t) if name is not None}
    except ValueError as e:
      raise EvalError(f'--template {t!r}: {e}; write a literal brace as {{{{ or }}}}.') from e
    if not fields or fields - {'word', 'numeral'}:
      raise EvalError(
        f"--template {t!r} must name the class with {{word}} ('seven') or {{numeral}} ('7') "
        f"and use no other field, e.g. 'an image of the number {{word}}'."
      )
  return templates


def prompt_set(num: int, templates: tuple[str, ...] = ()) -> PromptSet:
  """Class-balanced prompts: prompt i names class i % 10.

  Default (the benchmark): rounds r = i // 10 alternate seen (even r) and held-out (odd r)
  templates, cycling through each group's templates. With `templates` (a probe of the user's
  own phrasings), round r uses templates[r % len(templates)], so every template gets num /
  len(templates) prompts, num / (10 len(templates)) per class; a template counts as seen
  when training captions use it (digits.SEEN_TEMPLATES), else as held-out."""
  check_num(num)
  i = np.arange(num)
  labels = i % digits.NUM_CLASSES
  rounds = i // digits.NUM_CLASSES
  if templates:
    templates = check_templates(templates)
    group = digits.NUM_CLASSES * len(templates)
    if num % group:
      raise EvalError(
        f'--num must be a multiple of {group} with {len(templates)} --template (each template '
        f'names every class equally often), got {num}; e.g. '
        f'--num {max(2, round(num / group)) * group}.'
      )
    chosen = tuple(templates[r % len(templates)] for r in rounds)
    heldout = np.array([t not in digits.SEEN_TEMPLATES for t in chosen], bool)
  else:
    heldout = rounds % 2 == 1
    groups = (digits.SEEN_TEMPLATES, digits.HELDOUT_TEMPLATES)
    chosen = tuple(
      groups[int(h)][(r // 2) % len(groups[int(h)])] for r, h in zip(rounds, heldout, strict=True)
    )
  prompts = tuple(digits.caption(int(label), t) for label, t in zip(labels, chosen, strict=True))
  return PromptSet(prompts=prompts, labels=labels, heldout=heldout, templates=chosen)


@dataclasses.dataclass
class Reference:
  """The real train split as the evaluation sees it: judge features and pixels."""

  judge: Judge
  features: np.ndarray  # [M, F] judge features of the train images
  pixels: np.ndarray  # [M, R*R*3] float32 in [-1, 1]

  @classmethod
  def build(cls, judge: Judge) -> 'Reference':
    images, _ = digits.load_split('train', judge.resolution)
    pixels = digits.to_float(images)
    _, features = judge.predict(pixels)
    return cls(judge=judge, features=features, pixels=pixels.reshape(len(pixels), -1))


def score(
  images: np.ndarray,
  *,
  prompted: np.ndarray,
  heldout: np.ndarray,
  reference: Reference,
  k: int = 3,
  templates: tuple[str, ...] = (),
) -> dict:
  """One row: images [N, R, R, 3] in [-1, 1] whose prompts named classes `prompted` [N]. With
  each prompt's caption template (`templates` [N]), also `per_template`: {template: adherence}
  in the order the templates first appear, which shows which phrasing a model misreads."""
  predicted, features = reference.judge.predict(images)
  prompted, heldout = np.asarray(prompted), np.asarray(heldout, bool)
  precision, recall = metrics.precision_recall(real=reference.features, fake=features, k=k)
  nearest = metrics.nearest_distance(samples=images, reference=reference.pixels)
  row = {
    'n': len(images),
    'adherence': metrics.adherence(predicted=predicted, prompted=prompted),
    # None where no prompt is of that kind (a --template probe of held-out phrasings only)
    'adherence_seen': _adherence_of(predicted, prompted, ~heldout),
    'adherence_heldout': _adherence_of(predicted, prompted, heldout),
    'entropy_bits': metrics.class_entropy_bits(predicted=predicted, num_classes=digits.NUM_CLASSES),
    'fd': metrics.frechet_distance(features, reference.features),
    'precision': precision,
    'recall': recall,
    'nn_train': float(nearest.mean()),
    'border': metrics.border_level(images, width=max(1, images.shape[1] // 8)),
    'per_class': metrics.per_class_adherence(
      predicted=predicted, prompted=prompted, num_classes=digits.NUM_CLASSES
    ),
  }
  if templates:
    if len(templates) != len(prompted):
      raise ValueError(f'{len(templates)} templates for {len(prompted)} prompts.')
    of = np.asarray(templates)
    row['per_template'] = {
      t: metrics.adherence(predicted=predicted[of == t], prompted=prompted[of == t])
      for t in dict.fromkeys(templates)
    }
  return row


def _adherence_of(predicted: np.ndarray, prompted: np.ndarray, which: np.ndarray) -> float | None:
  if not which.any():
    return None
  return metrics.adherence(predicted=predicted[which], prompted=prompted[which])


def fd_at_matched_n(
  images: np.ndarray,
  prompted: np.ndarray,
  real_labels: np.ndarray,
  *,
  reference: Reference,
  k: int = 3,
) -> dict:
  """FD, precision and recall of the generated images subsampled to the real_test row's size
  and class mix (the first images prompted with each class, as many as real_test holds of it):
  FD shrinks as n grows, so the generated row at --num 500 against the floor's 359 test images
  flatters the ratio, and recall (the reference inside the generated set's k-NN balls) grows
  with n. {'fd_matched', 'precision_matched', 'recall_matched', 'n_matched'}; {} when a class
  has too few generated images."""
  prompted = np.asarray(prompted)
  keep = []
  for c in range(digits.NUM_CLASSES):
    want = int(np.sum(np.asarray(real_labels) == c))
    have = np.flatnonzero(prompted == c)
    if len(have) < want:
      return {}
    keep.extend(have[:want].tolist())
  _, features = reference.judge.predict(images[np.asarray(sorted(keep))])
  precision, recall = metrics.precision_recall(real=reference.features, fake=features, k=k)
  return {
    'fd_matched': metrics.frechet_distance(features, reference.features),
    'precision_matched': precision,
    'recall_matched': recall,
    'n_matched': len(keep),
  }


def alternate_heldout(labels: np.ndarray) -> np.ndarray:
  """[N] bool: every other item of each class (by rank within the class) flagged held-out,
  as in `prompt_set`, so the seen / held-out columns of calibration rows are class-balanced."""
  labels = np.asarray(labels)
  flags = np.zeros(len(labels), bool)
  for c in range(digits.NUM_CLASSES):
    where = np.flatnonzero(labels == c)
    flags[where] = np.arange(len(where)) % 2 == 1
  return flags


def _balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
  """The first `per_class` indices of each class, interleaved class by class."""
  by_class = [np.flatnonzero(labels == c)[:per_class] for c in range(digits.NUM_CLASSES)]
  return np.stack(by_class, axis=1).reshape(-1)


def calibration_sets(resolution: int, *, num: int, seed: int = 0, k: int = 3) -> dict[str, tuple]:
  """name -> (images [n, R, R, 3] float32 in [-1, 1], prompted [n], heldout [n]).

  real_test / shuffled_labels hold min(num, all) test images: num/10 per class while every
  class has that many, else the whole test split, so their sample size matches `num` where
  it can (FD and recall depend on it). noise holds num images; class_means num/10 copies of
  each class mean, but at least k + 1: with k or fewer, each copy's k-th neighbour is another
  class's mean, its k-NN ball spans the classes and the collapsed row scored recall ~0.96.
  """
  check_num(num)
  rng = np.random.default_rng(seed)
  test_images, test_labels = digits.load_split('test', resolution)
  per_class = num // digits.NUM_CLASSES
  if per_class <= np.bincount(test_labels).min():
    keep = _balanced_subset(test_labels, per_class)
  else:
    keep = np.arange(len(test_labels))
  real = digits.to_float(test_images[keep])
  labels = np.asarray(test_labels[keep], np.int64)
  train_images, train_labels = digits.load_split('train', resolution)
  train = digits.to_float(train_images)
  means = np.stack([train[train_labels == c].mean(0) for c in range(digits.NUM_CLASSES)])
  balanced = np.arange(num) % digits.NUM_CLASSES
  flags = alternate_heldout(balanced)
  copies = max(num // digits.NUM_CLASSES, int(k) + 1)
  mean_labels = np.arange(copies * digits.NUM_CLASSES) % digits.NUM_CLASSES
  noise = rng.uniform(-1.0, 1.0, (num, resolution, resolution, 3)).astype(np.float32)
  return {
    'real_test': (real, labels, alternate_heldout(labels)),
    'shuffled_labels': (real, rng.permutation(labels), alternate_heldout(labels)),
    'class_means': (means[mean_labels], mean_labels, alternate_heldout(mean_labels)),
    'noise': (noise, balanced, flags),
  }


def format_table(rows: dict[str, dict]) -> str:
  """The rows side by side, one line each."""
  head = ('row', 'n', 'adher', 'seen', 'heldout', 'H(bits)', 'FD', 'prec', 'recall', 'nn_train')
  head += ('border',)
  lines = ['{:<16}{:>5}{:>8}{:>8}{:>8}{:>8}{:>9}{:>7}{:>7}{:>9}{:>8}'.format(*head)]
  for name, r in rows.items():
    seen, held = (
      f'{"-":>8}' if v is None else f'{v:>8.3f}'  # '-': no prompt of that kind
      for v in (r['adherence_seen'], r['adherence_heldout'])
    )
    lines.append(
      f'{name:<16}{r["n"]:>5}{r["adherence"]:>8.3f}{seen}{held}'
      f'{r["entropy_bits"]:>8.2f}{r["fd"]:>9.2f}'
      f'{r["precision"]:>7.3f}{r["recall"]:>7.3f}{r["nn_train"]:>9.4f}{r["border"]:>8.3f}'
    )
  return '\n'.join(lines)


def format_per_class(row: dict) -> str:
  return '  '.join(f'{digits.CLASS_NAMES[c]} {a:.2f}' for c, a in enumerate(row['per_class']))


def format_per_template(row: dict) -> str:
  """Each template's adherence on one line, held-out ones (those no training caption uses)
  marked ('' without per_template)."""
  seen = set(digits.SEEN_TEMPLATES)
  return '  '.join(
    f"'{t}'{'' if t in seen else ' (held out)'} {a:.2f}"
    for t, a in row.get('per_template', {}).items()
  )
