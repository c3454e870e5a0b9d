from __future__ import annotations

import pytest
import yaml

from edgetrain.devices.profile import load_profile, parse_size, profile_from_dict
from edgetrain.devices.store import get_device, list_devices, save_profile
from edgetrain.errors import ProfileError, UnknownNameError

BUILTIN = ["cpu", "gtx750-1gb", "jetson-nano", "jetson-orin-nano", "jetson-xavier-nx"]


def test_builtin_profiles_are_listed_and_valid():
    assert list_devices() == BUILTIN
    assert list_devices("jetson*") == ["jetson-nano", "jetson-orin-nano", "jetson-xavier-nx"]
    for name in BUILTIN:
        p = get_device(name)
        assert 0 < p.usable_memory_bytes <= p.total_memory_bytes
        assert p.source == "spec" and p.reference


def test_spec_profiles_reserve_what_they_say():
    nano = get_device("jetson-nano")
    assert nano.total_memory_bytes == 4 * 2**30 and nano.unified_memory and nano.compute_capability == "5.3"
    assert nano.usable_memory_bytes == nano.total_memory_bytes - nano.reserved_total_bytes
    gtx = get_device("gtx750-1gb")
    assert gtx.usable_memory_bytes == gtx.total_memory_bytes - gtx.reserved_total_bytes
    assert gtx.allocator == "cuda-caching" and not gtx.bf16_supported


@pytest.mark.parametrize("name", BUILTIN[1:])
def test_round_trip_through_yaml(tmp_path, name):
    p = get_device(name)
    path = save_profile(p, "copy", tmp_path)
    assert load_profile(path) == p.replace(name=p.name)


def test_parse_size():
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("300 MiB") == 300 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(1024) == 1024
    with pytest.raises(ProfileError, match="size like"):
        parse_size("four gigs", "f.yaml", "memory.total")


def _good() -> dict:
    return yaml.safe_load(get_device("gtx750-1gb").to_yaml())


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("kind"), "kind"),
        (lambda d: d.update(kind="tpu"), "kind"),
        (lambda d: d["memory"].pop("total"), "memory.total"),
        (lambda d: d["memory"].update(usable="2GiB"), "memory.usable"),
        (lambda d: d["memory"].update(total="lots"), "memory.total"),
        (lambda d: d["compute"].pop("fp32_gflops"), "compute.fp32_gflops"),
        (lambda d: d["compute"].update(fp32_gflops="fast"), "compute.fp32_gflops"),
        (lambda d: d.update(memory=[1, 2]), "memory"),
        (lambda d: d["memory"].update(allocator="bump"), "memory.allocator"),
        (lambda d: d["memory"].update(reserved=["ctx"]), "memory.reserved"),
        (lambda d: d.update(provenance={"source": "guess"}), "provenance.source"),
    ],
)
def test_bad_profile_names_file_and_field(tmp_path, mutate, field):
    data = _good()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg and f"'{field}'" in msg and "\n" not in msg


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\nkind: cuda\n")
    with pytest.raises(ProfileError, match=r"broken.yaml: not valid YAML \(line"):
        load_profile(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "missing.yaml")


def test_unknown_device_suggests_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean jetson-nano"):
        get_device("jetson-nan")


def test_user_and_extra_directories_are_searched(tmp_path, isolated_home):
    from edgetrain.devices.store import add_profile_dir, user_dir

    mine = get_device("jetson-nano").replace(name="my-board", source="calibrated", reference="host@now")
    save_profile(mine)
    assert (user_dir() / "my-board.yaml").is_file() and str(isolated_home) in str(user_dir())
    assert "my-board" in list_devices() and get_device("my-board").source == "calibrated"
    extra = tmp_path / "extra"
    save_profile(mine.replace(name="lab-gpu"), "lab-gpu", extra)
    assert "lab-gpu" not in list_devices()
    add_profile_dir(extra)
    assert get_device("lab-gpu").name == "lab-gpu"


def test_profile_from_dict_rejects_zero_usable():
    data = _good()
    data["memory"]["usable"] = 0
    with pytest.raises(ProfileError, match="memory.usable"):
        profile_from_dict(data, "x.yaml")
