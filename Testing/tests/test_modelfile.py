import pickle

import pytest
import torch

from PatientFineTuneLib.modelfile import ModelBundle, ModelFileError, load_model, make_metadata, save_model

from conftest import tiny_model


def _bundle():
    model = tiny_model((1, 1))
    meta = make_metadata(
        model,
        [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}],
        (0.958, 0.958),
        preset="brain-wmh",
        training={"command": "test"},
    )
    return ModelBundle(model, meta)


def test_round_trip_gives_the_same_network_and_metadata(tmp_path):
    bundle = _bundle()
    path = tmp_path / "m.pt"
    sha = save_model(bundle, path)
    loaded = load_model(path)
    assert loaded.sha256 == sha and len(sha) == 64
    assert loaded.metadata["sequences"] == [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}]
    assert loaded.training_spacing == (0.958, 0.958)
    assert loaded.metadata["receptive_field_px"] == 123
    x = torch.randn(1, 2, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), bundle.model.eval()(x))


def test_never_overwrites_without_permission(tmp_path):
    path = tmp_path / "m.pt"
    save_model(_bundle(), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_model(_bundle(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_saved_files_get_ordinary_permissions(tmp_path):
    from PatientFineTuneLib.files import _UMASK

    path = tmp_path / "m.pt"
    save_model(_bundle(), path)
    # as a plain open() would create it, not the private 0600 of the temporary file
    assert path.stat().st_mode & 0o777 == 0o666 & ~_UMASK != 0o600


def _nudge_first_weight(payload):
    name = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][name] = payload["state_dict"][name] + 1e-3


def _relabel_preset(payload):
    payload["metadata_json"] = payload["metadata_json"].replace("brain-wmh", "liver-metastases")


@pytest.mark.parametrize("tamper", [_nudge_first_weight, _relabel_preset], ids=["weights", "metadata"])
def test_tampered_file_is_refused(tmp_path, tamper):
    path = tmp_path / "m.pt"
    save_model(_bundle(), path)
    payload = torch.load(path, weights_only=True)
    tamper(payload)
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="integrity"):
        load_model(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    save_model(_bundle(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_foreign_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "PatientFineTune-model", "x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(ModelFileError, match="nothing from it was executed") as error:
        load_model(path)
    assert not marker.exists()
    assert "weights_only" not in str(error.value) and "can still be loaded" not in str(
        error.value
    )  # never advise loading it


def test_bare_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(ModelFileError, match="not a PatientFineTune model"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt")


def _resaved(bundle, path, **changes):
    """A model file whose metadata was edited and whose hash was then recomputed (a
    re-saved model: the hash is integrity, not validity), written as save_model would."""
    import json

    from PatientFineTuneLib import modelfile

    metadata = dict(bundle.metadata) | changes
    state_dict = bundle.model.state_dict()
    metadata["sha256"] = modelfile._content_hash(metadata, state_dict)
    torch.save(
        {
            "format": modelfile.FORMAT_NAME,
            "format_version": modelfile.FORMAT_VERSION,
            "metadata_json": json.dumps(metadata, sort_keys=True),
            "state_dict": state_dict,
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"training_spacing_mm": [-2.0, -2.0]}, "training_spacing_mm"),
        ({"training_spacing_mm": [0.0, 0.958]}, "training_spacing_mm"),
        ({"training_spacing_mm": [0.958]}, "training_spacing_mm"),
        ({"sequences": [{"name": "FLAIR", "channels": 1}]}, "sequences"),
        ({"sequences": [{"name": "FLAIR", "channels": 2}, {"name": "T1", "channels": 1}]}, "sequences"),
        ({"preset": "brain-nonsense"}, "preset"),
    ],
)
def test_metadata_that_does_not_fit_the_network_is_refused_on_save_and_on_load(tmp_path, changes, words):
    """Spacing -2 segmented "0 lesions" with exit 0, spacing 0 divided by zero, a sequence
    list that does not match the pathways failed only after skull stripping."""
    bundle = _bundle()
    with pytest.raises(ValueError, match=words):
        save_model(ModelBundle(bundle.model, bundle.metadata | changes), tmp_path / "saved.pt")
    assert not (tmp_path / "saved.pt").exists()
    with pytest.raises(ModelFileError, match=words):
        load_model(_resaved(bundle, tmp_path / "resaved.pt", **changes))


def test_a_model_with_zero_spacing_is_one_line_from_the_command_line(tmp_path):
    import subprocess
    import sys

    path = _resaved(_bundle(), tmp_path / "zero.pt", training_spacing_mm=[0.0, 0.0])
    proc = subprocess.run(
        [sys.executable, "-m", "PatientFineTuneLib.cli", "--progress", "json", "info", path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2 and "training_spacing_mm" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    ), proc.stderr


def test_an_optional_sequence_is_kept_in_the_metadata_and_the_first_cannot_be_optional(tmp_path):
    net = tiny_model()
    sequences = [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1, "optional": True}]
    save_model(ModelBundle(net, make_metadata(net, sequences, (2.0, 2.0), preset="brain-wmh")), tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt").sequences == sequences
    with pytest.raises(ValueError, match="first sequence cannot be optional"):
        make_metadata(
            net, [{"name": "FLAIR", "channels": 1, "optional": True}, {"name": "T1", "channels": 1}], (2.0, 2.0)
        )


def test_saving_leaves_the_callers_bundle_as_it_was(tmp_path):
    """save_model writes the architecture and the hash into the file, not into the
    caller's bundle (the old code replaced ``bundle.metadata``)."""
    bundle = _bundle()
    before = dict(bundle.metadata)
    sha = save_model(bundle, tmp_path / "m.pt")
    assert bundle.metadata == before and "sha256" not in bundle.metadata
    assert load_model(tmp_path / "m.pt").sha256 == sha
