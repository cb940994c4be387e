"""The official FlatDINO experiment names, resolved into this project's options.

Two grammars of the official code (commit cdd398f), read for their facts:

- autoencoder, `flatdino/train.py` (`parse_experiment` / `build_config` / `compute_default_kl_weight`):
  `variant-T-EncDec-F[-hl][-nokl][-[M]klN][-anNk][-fbX][-klvarN][-erN][-drN][-tanh][-ilN][-iwX]`, every suffix at
  most once and in this order. variant fast|med|long|ext (50/100/150/300 epochs); Enc, Dec in t|s|b|l.
  `-hl` halves both depths (max(1, depth // 2)); `-nokl` sets the KL weight to 0 and wins over `-klN`; `-klN` is
  1e-N and `-MklN` is (M / 10^(len(M) - 1)) * 1e-N (`25kl7` = 2.5e-7, `375kl6` = 3.75e-6); `-anNk` anneals the KL
  weight linearly over N * 1000 updates; `-fbX` is a free-bits floor float(X) per latent dimension; `-klvarN` is a
  KL-variance weight 1e-N; `-erN` / `-drN` are disposable registers; `-tanh` squashes the latents.
- generator, `flatdino/train_generator.py` (`parse_experiment` / `build_config`):
  `dit{s|b|l|xl}[-dh][-kappaX][-xpred][-norm]`: LightningDiT size, the DiT^DH head, time shift kappa = float(X)
  (default sqrt(T F / 4096)), x-prediction, latent normalisation.

Supported here: everything but `-ilN` / `-iwX` (intermediate-layer targets) and `-xpred` (x-prediction), which are
refused by name, as is any other suffix, a suffix out of the official order or repeated (the official regexes do not
match those either), and the official static experiments (`baseline`, `fast-32`, `fast-32-64`: 6-layer GELU
configurations). Refusals are `UserError`s naming the suffix and listing the supported ones.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import NamedTuple

from models.flatdino import FlatDINOConfig, default_kl_weight
from pipeline.manifest import UserError

VARIANT_EPOCHS = {"fast": 50, "med": 100, "long": 150, "ext": 300}  # official build_config epochs_map
STATIC_EXPERIMENTS = ("baseline", "fast-32", "fast-32-64")  # official train.py _static_experiments


class Suffix(NamedTuple):
    """One suffix of a name grammar: its spelling in messages, its pattern and, when refused, why."""

    spelling: str
    pattern: str
    refused: str = ""


VAE_SUFFIXES: dict[str, Suffix] = {  # in the official order
    "hl": Suffix("-hl", r"hl"),
    "nokl": Suffix("-nokl", r"nokl"),
    "kl": Suffix("-klN / -MklN", r"(?P<mantissa>[0-9]+)?kl(?P<exp>[0-9]+)"),
    "an": Suffix("-anNk", r"an(?P<n>[0-9]+)k"),
    "fb": Suffix("-fbX", r"fb(?P<x>[0-9.]+)"),
    "klvar": Suffix("-klvarN", r"klvar(?P<n>[0-9]+)"),
    "er": Suffix("-erN", r"er(?P<n>[0-9]+)"),
    "dr": Suffix("-drN", r"dr(?P<n>[0-9]+)"),
    "tanh": Suffix("-tanh", r"tanh"),
    "il": Suffix("-ilN", r"il(?P<n>[0-9]+)", "intermediate DINOv2-layer targets are not implemented"),
    "iw": Suffix("-iwX", r"iw(?P<x>[0-9.]+)", "the intermediate-layer loss weight: not implemented"),
}
DIT_SUFFIXES: dict[str, Suffix] = {
    "dh": Suffix("-dh", r"dh"),
    "kappa": Suffix("-kappaX", r"kappa(?P<x>[0-9.]+)"),
    "xpred": Suffix("-xpred", r"xpred", "x-prediction: models.flow predicts the velocity only"),
    "norm": Suffix("-norm", r"norm"),
}
VAE_HEAD = re.compile(r"(?P<variant>fast|med|long|ext)-(?P<tokens>[0-9]+)-(?P<enc>[tsbl])(?P<dec>[tsbl])"
                      r"-(?P<dim>[0-9]+)")
DIT_HEAD = re.compile(r"dit(?P<size>xl|s|b|l)")
DIT_PRESET = {"s": "S", "b": "B", "l": "L", "xl": "XL"}  # models.dit.PRESETS; "-dh" -> models.dit_dh "dit<size>-dh"


@dataclass(frozen=True)
class VAEExperiment:
    """What an official autoencoder name asks for, in this project's vocabulary (train-vae options + model config)."""

    name: str
    variant: str  # fast | med | long | ext
    num_tokens: int  # T
    encoder: str  # size letter t | s | b | l
    decoder: str
    latent_dim: int  # F
    half_depth: bool = False  # -hl
    kl_weight: float | None = None  # None: the default 5.12e-4 / (T F); -nokl: 0.0
    kl_anneal_steps: int = 0  # -anNk: N * 1000; 0 = no annealing
    free_bits: float = 0.0  # -fbX
    encoder_registers: int = 0  # -erN (disposable)
    decoder_registers: int = 0  # -drN
    tanh: bool = False  # -tanh
    kl_var_weight: float = 0.0  # -klvarN: 1e-N; 0 = no KL-variance term

    @property
    def epochs(self) -> int:
        return VARIANT_EPOCHS[self.variant]

    @property
    def beta(self) -> float:
        """The KL weight actually used: `kl_weight`, or the default 5.12e-4 / (T F)."""
        return default_kl_weight(self.num_tokens, self.latent_dim) if self.kl_weight is None else self.kl_weight

    def model_config(self, feature_dim: int = 768, num_patches: int = 256) -> FlatDINOConfig:
        """The FlatDINO architecture this name builds (the feature shape comes from the data)."""
        return FlatDINOConfig(encoder=self.encoder, decoder=self.decoder, num_tokens=self.num_tokens,
                              latent_dim=self.latent_dim, feature_dim=feature_dim, num_patches=num_patches,
                              encoder_registers=self.encoder_registers, decoder_registers=self.decoder_registers,
                              half_depth=self.half_depth, tanh=self.tanh)

    def to_dict(self) -> dict:
        """JSON-able dict for manifests."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DiTExperiment:
    """What an official generator name asks for: a preset of `arch`'s PRESETS, kappa and latent normalisation."""

    name: str
    size: str  # official size s | b | l | xl
    arch: str  # "dit" (models.dit) | "dit-dh" (models.dit_dh)
    preset: str  # key of models.dit.PRESETS ("XL") or models.dit_dh.PRESETS ("ditxl-dh")
    kappa: float | None = None  # None: sqrt(T F / 4096) (train-dit --kappa 0)
    standardize_latents: bool = False  # -norm: per-(token, channel) standardised latents

    def to_dict(self) -> dict:
        """JSON-able dict for manifests."""
        return dataclasses.asdict(self)


def _supported(suffixes: dict[str, Suffix]) -> str:
    return ", ".join(s.spelling for s in suffixes.values() if not s.refused)


def _split_suffixes(name: str, tail: str, suffixes: dict[str, Suffix]) -> dict[str, re.Match]:
    """Match each '-token' of `tail` to one suffix, in the official order and at most once; refuse anything else."""
    found: dict[str, re.Match] = {}
    order = list(suffixes)
    for token in tail.split("-")[1:]:
        hit = next(((k, m) for k in order if (m := re.fullmatch(suffixes[k].pattern, token, re.ASCII))), None)
        if hit is None:
            raise UserError(f"experiment {name!r}: unknown suffix '-{token}'; supported suffixes, in this order: "
                            f"{_supported(suffixes)}")
        key, match = hit
        suffix = suffixes[key]
        if suffix.refused:
            raise UserError(f"experiment {name!r}: suffix '-{token}' ({suffix.spelling}) is not supported here "
                            f"({suffix.refused}); supported suffixes: {_supported(suffixes)}")
        if found and order.index(key) <= order.index(list(found)[-1]):
            raise UserError(f"experiment {name!r}: suffix '-{token}' is repeated or out of the official order; "
                            f"supported suffixes, in this order: {_supported(suffixes)}")
        found[key] = match
    return found


def _number(name: str, token: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"experiment {name!r}: '-{token}' needs a number, got {text!r}") from None


def resolve_vae_experiment(name: str) -> VAEExperiment:
    """An official autoencoder experiment name (e.g. "long-32-bl-128-kl3-an5k") -> its resolved options."""
    if name in STATIC_EXPERIMENTS:
        raise UserError(f"experiment {name!r} is one of the official static configurations {STATIC_EXPERIMENTS} "
                        "(6-layer GELU baselines), which are not supported; use variant-T-EncDec-F[-suffixes]")
    head = VAE_HEAD.match(name, 0)
    if head is None or (name[head.end():] and not name[head.end():].startswith("-")):
        raise UserError(f"experiment {name!r} is not an official autoencoder name: expected "
                        "{fast|med|long|ext}-T-{t|s|b|l}{t|s|b|l}-F[-suffixes], e.g. 'long-32-bl-128-kl3-an5k'")
    tokens, dim = int(head["tokens"]), int(head["dim"])
    if tokens <= 0 or dim <= 0:
        raise UserError(f"experiment {name!r}: T and F must be positive")
    found = _split_suffixes(name, name[head.end():], VAE_SUFFIXES)
    opts: dict = {}
    if "kl" in found:  # -klN: 1e-N; -MklN: M / 10^(len(M) - 1) * 1e-N, computed as the official code does
        m, exp = found["kl"]["mantissa"], int(found["kl"]["exp"])
        mantissa = int(m) / (10 ** (len(m) - 1)) if m else 1.0
        opts["kl_weight"] = mantissa * (10**-exp)
    if "nokl" in found:  # official `match (spec.nokl, spec.kl_weight)`: nokl first, whatever -klN says
        opts["kl_weight"] = 0.0
    if "an" in found:
        opts["kl_anneal_steps"] = int(found["an"]["n"]) * 1000
    if "fb" in found:
        opts["free_bits"] = _number(name, found["fb"][0], found["fb"]["x"])
    if "klvar" in found:
        opts["kl_var_weight"] = float(10 ** -int(found["klvar"]["n"]))
    for key, field in (("er", "encoder_registers"), ("dr", "decoder_registers")):
        if key in found:
            opts[field] = int(found[key]["n"])
    return VAEExperiment(name=name, variant=head["variant"], num_tokens=tokens, encoder=head["enc"],
                         decoder=head["dec"], latent_dim=dim, half_depth="hl" in found, tanh="tanh" in found, **opts)


def resolve_dit_experiment(name: str) -> DiTExperiment:
    """An official generator experiment name (e.g. "ditxl-kappa3", "ditl-dh-norm") -> its resolved options."""
    head = DIT_HEAD.match(name)
    if head is None or (name[head.end():] and not name[head.end():].startswith("-")):
        raise UserError(f"experiment {name!r} is not an official generator name: expected "
                        "dit{s|b|l|xl}[-dh][-kappaX][-xpred][-norm], e.g. 'ditxl-kappa3'")
    size = head["size"]
    found = _split_suffixes(name, name[head.end():], DIT_SUFFIXES)
    kappa = None
    if "kappa" in found:
        kappa = _number(name, found["kappa"][0], found["kappa"]["x"])
        if kappa <= 0:
            raise UserError(f"experiment {name!r}: kappa must be positive (t / (kappa - (kappa - 1) t))")
    dh = "dh" in found
    return DiTExperiment(name=name, size=size, arch="dit-dh" if dh else "dit",
                         preset=f"dit{size}-dh" if dh else DIT_PRESET[size], kappa=kappa,
                         standardize_latents="norm" in found)
