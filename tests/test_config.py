"""RWSAMConfig: invalid settings are refused at construction, naming the field and the value; valid ones construct."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import yaml

from hf_rwsam import RWSAMConfig

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
EXAMPLE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


def make(tmp_path, **kwargs):
    return RWSAMConfig(output_dir=str(tmp_path), **{**COMMON, **kwargs})


# (id, settings, the field the message must name, the bad value the message must show)
INVALID = [
    ("negative_rho", dict(sam_rho=-0.05), "sam_rho", -0.05),
    ("negative_eta", dict(sam_adaptive_eta=-0.01), "sam_adaptive_eta", -0.01),
    ("negative_eta_adaptive", dict(sam_adaptive=True, sam_adaptive_eta=-1.0), "sam_adaptive_eta", -1.0),
    ("unknown_mode", dict(sam_mode="asam"), "sam_mode", "asam"),
    ("unknown_mode_case", dict(sam_mode="SAM"), "sam_mode", "SAM"),
    ("unknown_scope", dict(sam_perturbation_scope="node"), "sam_perturbation_scope", "node"),
    ("unknown_estimator", dict(rwsam_estimator="hutchinson"), "rwsam_estimator", "hutchinson"),
    ("unknown_msam_impl", dict(sam_mode="msam", msam_micro_batch_size=4, msam_implementation="jit"),
     "msam_implementation", "jit"),
    ("unknown_normalize", dict(rwsam_normalize="max"), "rwsam_normalize", "max"),
    ("msam_m_missing", dict(sam_mode="msam", per_device_train_batch_size=8), "msam_micro_batch_size", None),
    ("msam_m_not_dividing", dict(sam_mode="msam", per_device_train_batch_size=8, msam_micro_batch_size=3),
     "msam_micro_batch_size", 3),
    ("msam_m_larger", dict(sam_mode="msam", per_device_train_batch_size=8, msam_micro_batch_size=16),
     "msam_micro_batch_size", 16),
    ("msam_m_zero", dict(sam_mode="msam", per_device_train_batch_size=8, msam_micro_batch_size=0),
     "msam_micro_batch_size", 0),
    ("msam_m_negative", dict(sam_mode="msam", per_device_train_batch_size=8, msam_micro_batch_size=-2),
     "msam_micro_batch_size", -2),
    ("negative_lambda", dict(rwsam_lambda=-1.0), "rwsam_lambda", -1.0),
    ("zero_probes", dict(rwsam_num_probes=0), "rwsam_num_probes", 0),
    ("negative_probes", dict(rwsam_num_probes=-3), "rwsam_num_probes", -3),
    ("target_ess_zero", dict(rwsam_target_ess=0.0), "rwsam_target_ess", 0.0),
    ("target_ess_negative", dict(rwsam_target_ess=-0.1), "rwsam_target_ess", -0.1),
    ("target_ess_above_one", dict(rwsam_target_ess=1.5), "rwsam_target_ess", 1.5),
    ("max_weight_below_one", dict(rwsam_max_weight=0.5), "rwsam_max_weight", 0.5),
    ("max_weight_zero", dict(rwsam_max_weight=0.0), "rwsam_max_weight", 0.0),
    ("fd_step_zero", dict(rwsam_fd_step=0.0), "rwsam_fd_step", 0.0),
    ("fd_step_negative", dict(rwsam_fd_step=-1.0), "rwsam_fd_step", -1.0),
    # infinities and NaN: refused by name (an inf rho gave NaN weights, an inf lambda, h or eta silently plain SGD)
    ("inf_rho", dict(sam_rho=math.inf), "sam_rho", math.inf),
    ("nan_rho", dict(sam_rho=math.nan), "sam_rho", math.nan),
    ("inf_eta", dict(sam_adaptive=True, sam_adaptive_eta=math.inf), "sam_adaptive_eta", math.inf),
    ("inf_lambda", dict(rwsam_lambda=math.inf), "rwsam_lambda", math.inf),
    ("nan_lambda", dict(rwsam_lambda=math.nan), "rwsam_lambda", math.nan),
    ("inf_fd_step", dict(rwsam_fd_step=math.inf), "rwsam_fd_step", math.inf),
    ("inf_vmap_memory", dict(sam_mode="msam", msam_micro_batch_size=4, msam_vmap_max_memory_mb=math.inf),
     "msam_vmap_max_memory_mb", math.inf),
    ("inf_target_ess", dict(rwsam_target_ess=math.inf), "rwsam_target_ess", math.inf),
    ("nan_target_ess", dict(rwsam_target_ess=math.nan), "rwsam_target_ess", math.nan),
    ("nan_max_weight", dict(rwsam_max_weight=math.nan), "rwsam_max_weight", math.nan),
    # a step fp32 cannot resolve in any network (||x|| >= 1): RW-SAM silently weighted uniformly
    ("fd_step_unresolvable", dict(rwsam_fd_step=1e-30), "rwsam_fd_step", 1e-30),
    ("fd_step_below_roundoff", dict(rwsam_fd_step=5e-8), "rwsam_fd_step", 5e-8),
    # types: a bool is a bool, an integer an integer, a number a number (strings as HfArgumentParser reads them)
    ("adaptive_not_a_bool_string", dict(sam_adaptive="maybe"), "sam_adaptive", "maybe"),
    ("adaptive_an_int", dict(sam_adaptive=1), "sam_adaptive", 1),
    ("msam_m_a_bool", dict(sam_mode="msam", msam_micro_batch_size=True), "msam_micro_batch_size", True),
    ("msam_m_a_float", dict(sam_mode="msam", msam_micro_batch_size=4.0), "msam_micro_batch_size", 4.0),
    ("msam_m_a_float_string", dict(sam_mode="msam", msam_micro_batch_size="4.5"), "msam_micro_batch_size", "4.5"),
    ("probes_a_bool", dict(rwsam_num_probes=True), "rwsam_num_probes", True),
    ("chunk_a_float", dict(rwsam_exact_chunk_size=2.5), "rwsam_exact_chunk_size", 2.5),
    ("lambda_not_a_number", dict(rwsam_lambda="one"), "rwsam_lambda", "one"),
    ("rho_a_bool", dict(sam_rho=True), "sam_rho", True),
    ("rho_none", dict(sam_rho=None), "sam_rho", None),
    ("fd_step_the_string_none", dict(rwsam_fd_step="None"), "rwsam_fd_step", "None"),
    ("global_scope_accumulation", dict(sam_perturbation_scope="global", gradient_accumulation_steps=2),
     "sam_perturbation_scope", "global"),
    ("global_scope_accumulation_sam", dict(sam_mode="sam", sam_perturbation_scope="global",
                                           gradient_accumulation_steps=4), "sam_perturbation_scope", "global"),
]


@pytest.mark.parametrize("settings, field_name, value", [case[1:] for case in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_settings_are_refused(tmp_path, settings, field_name, value):
    with pytest.raises(ValueError) as info:
        make(tmp_path, **settings)
    message = str(info.value)
    assert field_name in message, message
    # the bad value is shown after the field's name (repr, or str for strings shown without quotes)
    after = message[message.index(field_name) + len(field_name):]
    assert repr(value) in after or (isinstance(value, str) and value in after), message


# (settings as given, the values the fields then hold): strings read as HfArgumentParser reads them
COERCED = [
    (dict(sam_adaptive="false"), dict(sam_adaptive=False)),
    (dict(sam_adaptive="True"), dict(sam_adaptive=True)),
    (dict(sam_adaptive="yes", sam_adaptive_eta="0"), dict(sam_adaptive=True, sam_adaptive_eta=0.0)),
    (dict(rwsam_lambda="1.0", sam_rho="0.1"), dict(rwsam_lambda=1.0, sam_rho=0.1)),
    (dict(rwsam_fd_step="1e-3", rwsam_target_ess="0.5", rwsam_max_weight="4"),
     dict(rwsam_fd_step=1e-3, rwsam_target_ess=0.5, rwsam_max_weight=4.0)),
    (dict(sam_mode="msam", msam_micro_batch_size="4", per_device_train_batch_size=8),
     dict(msam_micro_batch_size=4)),
    (dict(rwsam_num_probes="3", sam_rho=1), dict(rwsam_num_probes=3, sam_rho=1.0)),
    (dict(rwsam_max_weight=math.inf), dict(rwsam_max_weight=math.inf)),  # documented: no cap
]


@pytest.mark.parametrize("settings, expected", COERCED, ids=[",".join(f"{k}={v!r}" for k, v in c[0].items())
                                                              for c in COERCED])
def test_settings_are_typed_as_hf_argument_parser_types_them(tmp_path, settings, expected):
    config = make(tmp_path, **settings)
    for name, value in expected.items():
        got = getattr(config, name)
        assert got == value and type(got) is type(value), (name, got)


def test_an_infinite_max_weight_is_no_cap():
    """rwsam_max_weight=inf is documented as no cap: the Gibbs weights are those without a cap (before, the cap of
    inf / b put an infinite weight on one sample)."""
    import torch

    from hf_rwsam.sharpness import gibbs_weights

    norms = torch.rand(8, generator=torch.Generator().manual_seed(0))
    uncapped = gibbs_weights(norms, 3.0)
    assert torch.equal(gibbs_weights(norms, 3.0, max_weight=math.inf), uncapped)
    assert not torch.equal(gibbs_weights(norms, 3.0, max_weight=1.5), uncapped)  # a finite cap does act


def test_yaml_null_and_yaml_1_1_numbers_parse(tmp_path):
    """`HfArgumentParser.parse_yaml_file`: a null field is None, and YAML 1.1 reads `1e-3` as a string, which the
    settings read as the number (it raised a raw TypeError)."""
    from transformers import HfArgumentParser

    settings = tmp_path / "settings.yaml"
    settings.write_text(f"output_dir: {tmp_path}\nrwsam_fd_step: null\nrwsam_lambda: 1e-3\nsam_adaptive: 'false'\n"
                        "use_cpu: true\nreport_to: none\n")
    (config,) = HfArgumentParser(RWSAMConfig).parse_yaml_file(str(settings))
    assert config.rwsam_fd_step is None and config.rwsam_lambda == 1e-3 and config.sam_adaptive is False


@pytest.mark.parametrize("path", sorted(EXAMPLE_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_settings_file_parses_as_written(tmp_path, path):
    """The examples' settings files through the examples' own argument handling: every sharpness-aware setting and
    every null arrive as written (the flag `--rwsam_fd_step None`, which a null became, was refused by argparse)."""
    sys.path.insert(0, str(EXAMPLE_CONFIGS.parent))
    try:
        from train_image_classification import parse_arguments
    finally:
        sys.path.remove(str(EXAMPLE_CONFIGS.parent))
    written = yaml.safe_load(path.read_text())
    model_args, data_args, config = parse_arguments([str(path), "--output_dir", str(tmp_path), "--use_cpu", "true"])
    ours = {name: value for name, value in written.items() if name.startswith(("sam_", "msam_", "rwsam_"))}
    assert ours, f"{path.name} sets no sharpness-aware field"
    for name, value in ours.items():
        assert getattr(config, name) == value, (name, value, getattr(config, name))
    for name in (name for name, value in written.items() if value is None):
        assert getattr(next(a for a in (model_args, data_args, config) if hasattr(a, name)), name) is None, name


def test_global_scope_with_accumulation_message_names_the_accumulation(tmp_path):
    with pytest.raises(ValueError) as info:
        make(tmp_path, sam_perturbation_scope="global", gradient_accumulation_steps=2)
    assert "gradient_accumulation_steps" in str(info.value) and "2" in str(info.value)


def test_msam_message_names_the_batch_size(tmp_path):
    with pytest.raises(ValueError) as info:
        make(tmp_path, sam_mode="msam", per_device_train_batch_size=8, msam_micro_batch_size=3)
    assert "per_device_train_batch_size" in str(info.value) and "8" in str(info.value)


VALID = [
    dict(),
    dict(sam_mode="none"),
    dict(sam_mode="sam", sam_rho=0.0),
    dict(sam_mode="sam", sam_adaptive=True, sam_adaptive_eta=0.0, sam_rho=2.0),
    dict(sam_mode="msam", per_device_train_batch_size=8, msam_micro_batch_size=1),
    dict(sam_mode="msam", per_device_train_batch_size=8, msam_micro_batch_size=4, msam_implementation="loop"),
    dict(sam_mode="msam", per_device_train_batch_size=8, msam_micro_batch_size=8, msam_implementation="vmap"),
    dict(sam_mode="rwsam", rwsam_lambda=0.0),
    dict(sam_mode="rwsam", rwsam_estimator="exact", rwsam_normalize="none", rwsam_lambda=3.0),
    dict(sam_mode="rwsam", rwsam_num_probes=1, rwsam_fd_step=1e-3),
    dict(sam_mode="rwsam", rwsam_target_ess=1.0),
    dict(sam_mode="rwsam", rwsam_target_ess=0.01, rwsam_max_weight=1.0),
    dict(sam_mode="rwsam", rwsam_max_weight=10.0),
    dict(sam_perturbation_scope="global"),
    dict(sam_perturbation_scope="global", gradient_accumulation_steps=1),
    dict(sam_perturbation_scope="device", gradient_accumulation_steps=4),
    # the plain Trainer step ignores the scope, so accumulation is fine there
    dict(sam_mode="none", sam_perturbation_scope="global", gradient_accumulation_steps=2),
    # m-SAM's m only matters in m-SAM mode
    dict(sam_mode="rwsam", msam_micro_batch_size=3, per_device_train_batch_size=8),
]


VALID_IDS = [",".join(f"{k}={v}" for k, v in s.items()) or "defaults" for s in VALID]


@pytest.mark.parametrize("settings", VALID, ids=VALID_IDS)
def test_valid_settings_construct(tmp_path, settings):
    config = make(tmp_path, **settings)
    for name, value in settings.items():
        assert getattr(config, name) == value


def test_defaults_are_documented_values(tmp_path):
    config = make(tmp_path)
    assert config.sam_mode == "rwsam"
    assert config.sam_rho == 0.05
    assert config.sam_perturbation_scope == "device"
    assert config.rwsam_estimator == "fd"
    assert config.rwsam_normalize == "mean"
    assert config.rwsam_fd_step is None and config.rwsam_target_ess is None and config.rwsam_max_weight is None


def test_every_sam_field_has_help(tmp_path):
    ours = [f for f in dataclasses.fields(RWSAMConfig) if f.name.startswith(("sam_", "msam_", "rwsam_"))]
    names = {f.name for f in ours}
    # the fields of the public API (docs/ARCHITECTURE.md) are all there
    assert {"sam_mode", "sam_rho", "sam_adaptive", "sam_adaptive_eta", "sam_perturbation_scope",
            "msam_micro_batch_size", "msam_implementation", "rwsam_lambda", "rwsam_estimator", "rwsam_num_probes",
            "rwsam_fd_step", "rwsam_normalize", "rwsam_target_ess", "rwsam_max_weight"} <= names
    for f in ours:
        help_text = f.metadata.get("help")
        assert isinstance(help_text, str) and help_text.strip(), f"{f.name} has no help string"


def test_msam_refuses_at_construction_a_last_batch_that_does_not_split_into_groups(tmp_path):
    import torch

    from hf_rwsam import RWSAMTrainer
    from utils import TinyMLP, make_tensors, sgd_config, tensor_dataset

    x, y = make_tensors(29)
    args = sgd_config(tmp_path, sam_mode="msam", msam_micro_batch_size=4, per_device_train_batch_size=8)
    with pytest.raises(ValueError, match=r"msam_micro_batch_size=4 .* leave 5\); set dataloader_drop_last=True .* multiple of the batch size"):
        RWSAMTrainer(model=TinyMLP(), args=args, train_dataset=tensor_dataset(x, y))
    args = sgd_config(tmp_path, sam_mode="msam", msam_micro_batch_size=4, per_device_train_batch_size=8,
                      dataloader_drop_last=True, max_steps=1)
    torch.manual_seed(0)
    RWSAMTrainer(model=TinyMLP(), args=args, train_dataset=tensor_dataset(x, y)).train()  # drop_last: accepted


@pytest.mark.parametrize("mode, batch, warned", [("rwsam", 1, True), ("rwsam", 2, False), ("sam", 1, False)])
def test_rwsam_on_one_sample_per_device_says_it_is_sam_at_construction(tmp_path, mode, batch, warned):
    """The Gibbs weights of one sample are 1 whatever its gradient norm: RW-SAM at per_device_train_batch_size=1
    (device scope, or one process) is SAM, and the trainer says so when it is built."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    from hf_rwsam import RWSAMTrainer
    from utils import TinyMLP, make_tensors, sgd_config, tensor_dataset

    x, y = make_tensors(4)
    with CaptureLogger(logging.get_logger("hf_rwsam.config")) as captured:
        RWSAMTrainer(model=TinyMLP(), args=sgd_config(tmp_path, sam_mode=mode, per_device_train_batch_size=batch),
                     train_dataset=tensor_dataset(x, y))
    assert ("per_device_train_batch_size=1 is SAM" in captured.out) is warned, captured.out


def test_the_string_settings_are_choices_on_the_command_line():
    """`Literal` types: HfArgumentParser offers their values as choices and refuses others before RWSAMConfig runs."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(RWSAMConfig)
    actions = {a.dest: a for a in parser._actions}
    expected = {"sam_mode": ["none", "sam", "msam", "rwsam"], "sam_perturbation_scope": ["device", "global"],
                "msam_implementation": ["auto", "loop", "vmap"], "rwsam_estimator": ["fd", "exact"],
                "rwsam_normalize": ["mean", "none"]}
    for name, choices in expected.items():
        assert list(actions[name].choices) == choices, name
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "out", "--rwsam_estimator", "ghost"])
    (config,) = parser.parse_args_into_dataclasses(["--output_dir", "out", "--rwsam_estimator", "exact"])
    assert config.rwsam_estimator == "exact"
