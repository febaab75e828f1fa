"""Pushing to the Hub through the Trainer's own machinery, against a local server (`hub_server.LocalHub`).

The Trainer test runs in a child process whose environment points ``HF_ENDPOINT`` at the server before
huggingface_hub and transformers read it, with ``HF_HUB_OFFLINE=0`` there only and a fresh ``HF_HOME``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file

from hub_server import LocalHub
from utils import front_matter

TOKEN = "hf_dummy_token"
CHILD_TIMEOUT_S = 240


@pytest.fixture
def hub():
    with LocalHub(token=TOKEN) as server:
        yield server


@pytest.fixture
def online(hub, monkeypatch):
    """Lets huggingface_hub reach the network in this process, with its default endpoint on the local hub (so a
    request the test does not address explicitly shows up in `LocalHub.unrouted`) and no telemetry."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


# --------------------------------------------------------------------------------------------- the server itself


def test_local_hub_answers_huggingface_hub_uploads_and_downloads(hub, online, tmp_path):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    url = api.create_repo("user/data")
    assert url.repo_id == "user/data" and api.create_repo("user/data", exist_ok=True).repo_id == "user/data"
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    files = {
        "README.md": b"---\ntags:\n- x\n---\n# data\n",
        "config.json": b'{"a": 1}',
        "sub/weights.bin": os.urandom(100_000),
    }
    for path, content in files.items():
        (folder / path).write_bytes(content)

    api.upload_folder(repo_id="user/data", folder_path=folder, commit_message="first")
    api.upload_folder(repo_id="user/data", folder_path=folder, commit_message="unchanged")
    assert [c.message for c in hub.repos["user/data"].commits] == ["initial commit", "first"]  # nothing to commit
    assert {path: hub.file("user/data", path) for path in files} == files

    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\n[unclosed\n---\n", path_in_repo="README.md", repo_id="user/data")
    with pytest.raises(HfHubHTTPError, match="401"):
        HfApi(endpoint=hub.url, token="wrong").upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="user/data")

    assert [(e.path, type(e).__name__) for e in api.list_repo_tree("user/data")] == [
        ("README.md", "RepoFile"), ("config.json", "RepoFile"), ("sub", "RepoFolder"),
    ]
    snapshot = Path(snapshot_download("user/data", endpoint=hub.url, cache_dir=tmp_path / "cache"))
    assert {path: (snapshot / path).read_bytes() for path in files} == files
    with pytest.raises(RemoteEntryNotFoundError):
        api.hf_hub_download("user/data", "missing.txt", cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFoundError):
        api.hf_hub_download("user/nothing", "config.json", cache_dir=tmp_path / "cache")
    assert hub.unrouted == []


# --------------------------------------------------------------------------------------------- the Trainer


@pytest.mark.slow  # a training run and a push in a child process
def test_trainer_pushes_model_and_card_and_the_model_loads_back(hub, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("HF_TOKEN", None)
    child = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-5000:]
    assert hub.unrouted == []
    log_history = json.loads((tmp_path / "log_history.json").read_text())

    # hub_strategy="end": one commit, from trainer.push_to_hub(), with the final save of output_dir
    assert [c.message for c in hub.repos["user/tiny"].commits] == ["initial commit", "End of training"]
    for name in ("config.json", "model.safetensors", "README.md"):
        assert hub.file("user/tiny", name) == (tmp_path / "user-tiny" / name).read_bytes(), name
    card = hub.file("user/tiny", "README.md")
    assert b"| `rwsam_lambda` | `0.7` |" in card and b"| `sam_mode` | `rwsam` |" in card
    meta = front_matter(card.decode())
    assert meta["license"] == "apache-2.0"  # push_to_hub's keyword arguments reach the card
    assert {"hf-rwsam", "rwsam"} <= set(meta["tags"])
    last_accuracy = [entry["eval_accuracy"] for entry in log_history["user/tiny"] if "eval_accuracy" in entry][-1]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(last_accuracy)

    # the card's loading snippet, run by the child, downloaded the pushed files: the weights are the trained ones
    assert b'AutoModelForImageClassification.from_pretrained("user/tiny")' in card
    downloads = [path for method, path in hub.requests if method == "GET" and path.startswith("/user/tiny/resolve/")]
    assert {Path(path).name for path in downloads} >= {"config.json", "model.safetensors"}
    trained, loaded = load_file(tmp_path / "trained.safetensors"), load_file(tmp_path / "loaded.safetensors")
    assert trained.keys() == loaded.keys()
    assert all(trained[k].equal(loaded[k]) for k in trained)

    # hub_strategy="checkpoint": each checkpoint pushes output_dir (with a fresh card) and last-checkpoint/; the
    # Trainer skips a push while the previous one is still uploading, so step 2's may legitimately be missing
    commits = {c.message: c for c in hub.repos["user/tiny-ckpt"].commits}
    pushed_steps = [step for step in (1, 2) if f"Training in progress, step {step}" in commits]
    assert pushed_steps[:1] == [1], list(commits)
    for step in pushed_steps:
        at_step = commits[f"Training in progress, step {step}"]
        assert "model.safetensors" in at_step.files
        assert f"Optimizer steps: {step} ".encode() in at_step.files["README.md"]
        checkpoint = commits[f"Training in progress, step {step}, checkpoint"].files
        assert f"Optimizer steps: {step} ".encode() in checkpoint["last-checkpoint/README.md"]
        assert "last-checkpoint/optimizer.pt" in checkpoint


def push_and_load(workdir: Path) -> None:
    """The child process: trains and pushes ``user/tiny`` (hub_strategy "end") and ``user/tiny-ckpt`` ("checkpoint"),
    then loads ``user/tiny`` back as its card says; leaves the weights and logs in ``workdir``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification

    from hf_rwsam import RWSAMTrainer
    from hf_rwsam.models import create_model

    from utils import accuracy
    from utils import sgd_config, tensor_dataset

    torch.manual_seed(0)
    data = tensor_dataset(torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,)), input_name="pixel_values")
    log_history = {}
    for repo_id, strategy in (("user/tiny", "end"), ("user/tiny-ckpt", "checkpoint")):
        model = create_model("small_cnn", num_labels=3)  # an hf-rwsam architecture: loads after `import hf_rwsam`
        args = sgd_config(
            workdir / repo_id.replace("/", "-"), sam_mode="rwsam", rwsam_lambda=0.7, max_steps=2,
            save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
            push_to_hub=True, hub_model_id=repo_id, hub_token=TOKEN, hub_strategy=strategy,
            hub_always_push=True,  # step 2 pushes even if step 1's upload is still running
        )
        trainer = RWSAMTrainer(
            model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=accuracy, dataset_name="toy"
        )
        trainer.train()
        log_history[repo_id] = trainer.state.log_history
        if strategy == "end":
            trainer.push_to_hub(license="apache-2.0")
            save_file(model.state_dict(), workdir / "trained.safetensors")
    (workdir / "log_history.json").write_text(json.dumps(log_history))
    loaded = AutoModelForImageClassification.from_pretrained("user/tiny")
    save_file(loaded.state_dict(), workdir / "loaded.safetensors")


if __name__ == "__main__":
    push_and_load(Path(sys.argv[1]))
