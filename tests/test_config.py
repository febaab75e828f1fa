"""RWSAMConfig: invalid settings are refused at construction, naming the field and the value; valid ones construct."""

from __future__ import annotations

import dataclasses

import pytest

from hf_rwsam import RWSAMConfig

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)


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
    # the fields of the public API (ARCHITECTURE.md) are all there
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
