"""Official experiment names -> resolved options (pipeline/experiments.py), checked against the official grammars.

Official sources (noctrog/flatdino @ cdd398f): `flatdino/train.py` `parse_experiment` (lines 801-895: the regex, the
`-anNk` x 1000, the `-MklN` mantissa rule, `-klvarN` = 10^-N, `-fbX` = float(X)), `build_config` (lines 897-987: epochs
per variant, `-hl` = max(1, depth // 2), `-nokl` winning over `-klN`), `compute_default_kl_weight` (lines 766-777:
1e-6 * 512 / (T F)); `flatdino/train_generator.py` `parse_experiment` (lines 1050-1095:
`dit{s|b|l|xl}[-dh][-kappa{float}][-xpred][-norm]`) and `build_config` (lines 1097-1137).
"""

import dataclasses
import itertools
import json
import random
import re

import pytest
import torch

from models import dit, dit_dh
from models.flatdino import FlatDINO
from pipeline.experiments import DiTExperiment, VAEExperiment, resolve_dit_experiment, resolve_vae_experiment
from pipeline.manifest import UserError


def vae(name, variant, t, enc, dec, f, **kw) -> VAEExperiment:
    return VAEExperiment(name=name, variant=variant, num_tokens=t, encoder=enc, decoder=dec, latent_dim=f, **kw)


VAE_TABLE = [
    # the brief's example: kl3 = 1e-3 (train.py:858), an5k = 5 * 1000 updates (train.py:846)
    ("long-32-bl-128-kl3-an5k", dict(kl_weight=1e-3, kl_anneal_steps=5000)),
    ("fast-32-sb-128", {}),  # kl_weight None -> default 5.12e-4 / (T F) (train.py:914-915)
    ("med-32-bl-64", {}),
    ("ext-16-tt-256", {}),
    ("fast-32-sb-128-nokl", dict(kl_weight=0.0)),
    ("fast-32-sb-128-25kl7", dict(kl_weight=2.5e-7)),  # docstring example, train.py:810
    ("fast-32-sb-128-375kl6", dict(kl_weight=3.75e-6)),  # train.py:811
    ("fast-32-sb-128-1kl3", dict(kl_weight=1e-3)),  # mantissa "1" -> 1 / 10^0
    ("fast-32-sb-128-05kl3", dict(kl_weight=5e-4)),  # mantissa "05" -> 5 / 10^1
    ("fast-32-sb-128-fb0.1", dict(free_bits=0.1)),
    ("fast-32-sb-128-fb2", dict(free_bits=2.0)),
    ("fast-32-sb-128-klvar3", dict(kl_var_weight=1e-3)),  # 10 ** -3 (train.py:863)
    ("fast-32-sb-128-klvar0", dict(kl_var_weight=1.0)),
    ("fast-32-sb-128-er4", dict(encoder_registers=4)),
    ("fast-32-sb-128-er4-dr4", dict(encoder_registers=4, decoder_registers=4)),
    ("fast-32-sb-128-tanh", dict(tanh=True)),
    ("fast-32-bb-128-hl", dict(half_depth=True)),
    ("fast-32-sb-128-nokl-kl3", dict(kl_weight=0.0)),  # build_config matches nokl before the explicit weight
    ("med-32-bl-128-hl-25kl7-an10k-fb0.5-klvar2-er4-dr2-tanh",
     dict(half_depth=True, kl_weight=2.5e-7, kl_anneal_steps=10_000, free_bits=0.5, kl_var_weight=1e-2,
          encoder_registers=4, decoder_registers=2, tanh=True)),
]


@pytest.mark.parametrize("name,expected", VAE_TABLE, ids=[n for n, _ in VAE_TABLE])
def test_vae_names_resolve_as_the_official_parser(name, expected):
    variant, t, encdec, f = name.split("-")[:4]
    want = vae(name, variant, int(t), encdec[0], encdec[1], int(f), **expected)
    got = resolve_vae_experiment(name)
    assert dataclasses.replace(got, kl_weight=want.kl_weight) == want  # 375kl6 is 3.75 * 1e-6, not the literal 3.75e-6
    assert (got.kl_weight is None) == (want.kl_weight is None)
    if want.kl_weight is not None:
        assert got.kl_weight == pytest.approx(want.kl_weight, rel=1e-12)


def test_epochs_and_default_beta():
    epochs = [resolve_vae_experiment(f"{v}-32-bl-128").epochs for v in ("fast", "med", "long", "ext")]
    assert epochs == [50, 100, 150, 300]
    default = resolve_vae_experiment("long-32-bl-128")
    assert default.kl_weight is None and default.beta == pytest.approx(1e-6 * 512 / (32 * 128), rel=1e-12)
    assert default.beta == pytest.approx(1.25e-7, rel=1e-12)
    assert resolve_vae_experiment("long-32-bl-64").beta == pytest.approx(2.5e-7, rel=1e-12)
    assert resolve_vae_experiment("long-32-bl-128-nokl").beta == 0.0
    assert resolve_vae_experiment("long-32-bl-128-kl3").beta == 1e-3


def test_to_dict_is_json_and_complete():
    e = resolve_vae_experiment("med-32-bl-128-hl-kl3-an5k-fb0.1-klvar3-er4-dr2-tanh")
    d = json.loads(json.dumps(e.to_dict()))
    assert VAEExperiment(**d) == e
    assert set(d) == {"name", "variant", "num_tokens", "encoder", "decoder", "latent_dim", "half_depth", "kl_weight",
                      "kl_anneal_steps", "free_bits", "encoder_registers", "decoder_registers", "tanh", "kl_var_weight"}
    g = resolve_dit_experiment("ditl-dh-kappa2-norm")
    assert DiTExperiment(**json.loads(json.dumps(g.to_dict()))) == g


def test_model_config_builds_what_the_name_asks_for():
    cfg = resolve_vae_experiment("ext-32-bl-128-hl-er4-dr2-tanh").model_config()
    with torch.device("meta"):
        model = FlatDINO(cfg)
    assert len(model.encoder.trunk.blocks) == 6 and len(model.decoder.trunk.blocks) == 12  # vit-b 12, vit-l 24
    assert model.encoder.registers.shape == (1, 4, 768) and model.decoder.registers.shape == (1, 2, 1024)
    assert cfg.tanh and cfg.latent_shape == (32, 128) and (cfg.feature_dim, cfg.num_patches) == (768, 256)


@pytest.mark.parametrize("name,match", [
    ("fast-32-sb-128-il4", r"'-il4' \(-ilN\) is not supported"),
    ("fast-32-sb-128-il4-iw05", r"'-il4' \(-ilN\) is not supported"),
    ("fast-32-sb-128-iw05", r"'-iw05' \(-iwX\) is not supported"),
    ("fast-32-sb-128-foo", r"unknown suffix '-foo'"),
    ("fast-32-sb-128-kl", r"unknown suffix '-kl'"),
    ("fast-32-sb-128-an5", r"unknown suffix '-an5'"),
    ("fast-32-sb-128-", r"unknown suffix '-'"),
    ("fast-32-sb-128-an5k-kl3", r"'-kl3' is repeated or out of the official order"),
    ("fast-32-sb-128-tanh-tanh", r"'-tanh' is repeated"),
    ("fast-32-sb-128-er2-er4", r"'-er4' is repeated"),
    ("fast-32-sb-128-fb.", r"'-fb\.' needs a number"),
    ("fast-32-sb-128-fb0.1.2", r"needs a number"),
    ("baseline", r"official static configurations"),
    ("fast-32-64", r"official static configurations"),
    ("fast-32-xb-128", r"not an official autoencoder name"),
    ("slow-32-bl-128", r"not an official autoencoder name"),
    ("fast-32-bl-128x", r"not an official autoencoder name"),
    ("fast-0-bl-128", r"must be positive"),
])
def test_vae_refusals_name_the_suffix_and_list_the_supported_ones(name, match):
    with pytest.raises(UserError, match=match) as e:
        resolve_vae_experiment(name)
    if "suffix '" in str(e.value):
        assert "-hl, -nokl, -klN / -MklN, -anNk, -fbX, -klvarN, -erN, -drN, -tanh" in str(e.value)


# The grammar as SPEC 4.5 / the official docstring writes it, as an independent acceptance oracle.
GRAMMAR = re.compile(r"(fast|med|long|ext)-[0-9]+-[tsbl]{2}-[0-9]+(-hl)?(-nokl)?(-[0-9]*kl[0-9]+)?(-an[0-9]+k)?"
                     r"(-fb[0-9.]+)?(-klvar[0-9]+)?(-er[0-9]+)?(-dr[0-9]+)?(-tanh)?(-il[0-9]+)?(-iw[0-9.]+)?")
TOKENS = ["-hl", "-nokl", "-kl3", "-25kl7", "-an5k", "-fb0.25", "-klvar2", "-er3", "-dr1", "-tanh", "-il4", "-iw05"]


def test_acceptance_equals_the_official_grammar_on_random_suffix_lists():
    rng = random.Random(0)
    lists = [list(c) for r in (1, 2) for c in itertools.permutations(TOKENS, r)]
    lists += [rng.choices(TOKENS, k=rng.randint(2, 6)) for _ in range(400)]
    accepted = 0
    for tokens in lists:
        name = "med-32-sb-64" + "".join(tokens)
        in_grammar = GRAMMAR.fullmatch(name) is not None
        supported = in_grammar and not {"-il4", "-iw05"} & set(tokens)
        try:
            e = resolve_vae_experiment(name)
        except UserError:
            assert not supported, name
            continue
        assert supported, name
        accepted += 1
        assert e.tanh == ("-tanh" in tokens) and e.half_depth == ("-hl" in tokens)
        assert e.encoder_registers == (3 if "-er3" in tokens else 0)
    assert accepted > 50


DIT_TABLE = [
    ("ditxl-kappa3", DiTExperiment("ditxl-kappa3", "xl", "dit", "XL", 3.0, False)),  # the repo's example run
    ("dits", DiTExperiment("dits", "s", "dit", "S", None, False)),
    ("ditb", DiTExperiment("ditb", "b", "dit", "B", None, False)),
    ("ditl-dh", DiTExperiment("ditl-dh", "l", "dit-dh", "ditl-dh", None, False)),
    ("ditb-dh-kappa2.5", DiTExperiment("ditb-dh-kappa2.5", "b", "dit-dh", "ditb-dh", 2.5, False)),
    ("dits-kappa0.5", DiTExperiment("dits-kappa0.5", "s", "dit", "S", 0.5, False)),
    ("ditb-norm", DiTExperiment("ditb-norm", "b", "dit", "B", None, True)),
    ("ditl-dh-kappa2-norm", DiTExperiment("ditl-dh-kappa2-norm", "l", "dit-dh", "ditl-dh", 2.0, True)),
    ("ditxl-dh", DiTExperiment("ditxl-dh", "xl", "dit-dh", "ditxl-dh", None, False)),
]


@pytest.mark.parametrize("name,expected", DIT_TABLE, ids=[n for n, _ in DIT_TABLE])
def test_dit_names_resolve_as_the_official_parser(name, expected):
    got = resolve_dit_experiment(name)
    assert got == expected
    presets = dit_dh.PRESETS if got.arch == "dit-dh" else dit.PRESETS
    assert got.preset in presets
    width = {"s": 384, "b": 768, "l": 1024, "xl": 1152}[got.size]  # LIGHTNING_DIT_CONFIGS embed_dim
    assert presets[got.preset].width == width


@pytest.mark.parametrize("name,match", [
    ("ditb-xpred", r"'-xpred' \(-xpred\) is not supported"),
    ("ditl-dh-kappa2-xpred", r"'-xpred' \(-xpred\) is not supported"),
    ("ditxl-norm-dh", r"'-dh' is repeated or out of the official order"),
    ("ditxl-kappa3-dh", r"out of the official order"),
    ("ditxl-dh-dh", r"repeated"),
    ("ditxl-foo", r"unknown suffix '-foo'"),
    ("ditxl-kappa", r"unknown suffix '-kappa'"),
    ("ditxl-kappa.", r"needs a number"),
    ("ditxl-kappa0", r"kappa must be positive"),
    ("ditxxl", r"not an official generator name"),
    ("ditt", r"not an official generator name"),
    ("dit-xl", r"not an official generator name"),
])
def test_dit_refusals(name, match):
    with pytest.raises(UserError, match=match) as e:
        resolve_dit_experiment(name)
    if "suffix '" in str(e.value):
        assert "-dh, -kappaX, -norm" in str(e.value)
