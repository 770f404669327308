"""``python -m maisi.download`` against a fake Hugging Face on 127.0.0.1 (no internet, a few hundred KB per file).

The fake answers ``/{repo}/resolve/main/{path}`` like Hugging Face answers an LFS file: a 302 to ``/cdn/NAME`` that
carries ``X-Linked-Etag`` (the SHA-256, quoted) and ``X-Linked-Size``; ``/cdn/NAME`` serves the bytes and honours
``Range: bytes=N-`` with a 206. Knobs on :class:`FakeHub` make it lie, forget files, ignore ranges or hang up.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from maisi import download
from maisi.download import main

REPO = Path(__file__).resolve().parents[1]
HF_REPO = "nvidia/NV-Generate-CT"
RFLOW = ("autoencoder_v1.pt", "diff_unet_3d_rflow-ct.pt", "controlnet_3d_rflow-ct.pt")
_rng = random.Random(0)
FILES = {name: _rng.randbytes(200_000 + 50_000 * i) for i, name in enumerate(RFLOW)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeHub:
    base_url: str = ""
    files: dict[str, bytes] = field(default_factory=lambda: dict(FILES))
    announce: dict[str, str | None] = field(default_factory=dict)  # name -> announced sha (None: announce none)
    honour_range: bool = True
    hang_up_after: dict[str, int] = field(default_factory=dict)  # name -> bytes sent before closing the connection
    log: list[tuple[str, str, str | None, int, int]] = field(default_factory=list)  # method, name, Range, status, sent

    def requests(self, method: str, name: str) -> list[tuple[str, str, str | None, int, int]]:
        return [r for r in self.log if r[0] == method and r[1] == name]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set per server

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        prefix = f"/{HF_REPO}/resolve/main/models/"
        if self.path.startswith(prefix) and self.path[len(prefix) :] in self.hub.files:
            return self._redirect(self.path[len(prefix) :])
        if self.path.startswith("/cdn/") and self.path[5:] in self.hub.files:
            return self._serve(self.path[5:], body)
        self._record(self.path, 404, 0)
        self.send_error(404)

    def _record(self, name: str, status: int, sent: int) -> None:
        self.hub.log.append((self.command, name, self.headers.get("Range"), status, sent))

    def _redirect(self, name: str) -> None:
        data = self.hub.files[name]
        announced = self.hub.announce.get(name, sha(data))
        self._record(f"resolve/{name}", 302, 0)
        self.send_response(302)
        self.send_header("Location", f"/cdn/{name}")
        if announced is not None:
            self.send_header("X-Linked-Etag", f'"{announced}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, name: str, body: bool) -> None:
        data = self.hub.files[name]
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and self.hub.honour_range else 0
        if start >= len(data) and start:
            self._record(name, 416, 0)
            return self.send_error(416)
        chunk = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if body:
            chunk = chunk[: self.hub.hang_up_after.pop(name, len(chunk))]  # HTTP/1.0: returning closes the socket
            self.wfile.write(chunk)
        self._record(name, 206 if start else 200, len(chunk) if body else 0)


@pytest.fixture
def hub() -> FakeHub:
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": state}))
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch) -> None:
    """No token, mirror or proxy from the environment may reach the tests."""
    for var in ("HF_TOKEN", "HF_ENDPOINT", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def fetch(base_url: str, dest: Path, *extra: str) -> int:
    return main(["--variant", "rflow-ct", "--dest", str(dest), "--base-url", base_url, *extra])


def assert_installed(dest: Path, names=RFLOW) -> None:
    for name in names:
        assert (dest / name).read_bytes() == FILES[name], name
        assert (dest / f"{name}.sha256").read_text() == f"{sha(FILES[name])}  {name}\n"
        assert not (dest / f"{name}.part").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


# ---------------------------------------------------------------- success, skip, force


def test_downloads_verifies_then_skips(hub, tmp_path, capsys):
    dest = tmp_path / "models" / "maisi"
    assert fetch(hub.base_url, dest) == 0
    out = capsys.readouterr().out
    assert_installed(dest)
    assert out.count("Licence:") == 1 and "NVIDIA" in out
    assert "3 downloaded, 0 skipped (already present), 0 failed" in out
    assert sorted(p.name for p in dest.iterdir()) == sorted([*RFLOW, *(f"{n}.sha256" for n in RFLOW)])

    hub.log.clear()
    assert fetch(hub.base_url, dest) == 0
    out = capsys.readouterr().out
    assert out.count("already present, verified") == 3 and "0 downloaded, 3 skipped" in out
    assert not [r for r in hub.log if r[0] == "GET"]  # only the checksum probes
    assert_installed(dest)


def test_force_downloads_again(hub, tmp_path, capsys):
    assert fetch(hub.base_url, tmp_path) == 0
    hub.log.clear()
    assert fetch(hub.base_url, tmp_path, "--force") == 0
    assert "3 downloaded, 0 skipped" in capsys.readouterr().out
    assert all(hub.requests("GET", name) for name in RFLOW)
    assert_installed(tmp_path)


def test_file_put_there_by_hand_is_hashed_once_and_a_wrong_one_replaced(hub, tmp_path, capsys):
    (tmp_path / RFLOW[0]).write_bytes(FILES[RFLOW[0]])  # right bytes, no sidecar
    (tmp_path / RFLOW[1]).write_bytes(b"x" * len(FILES[RFLOW[1]]))  # wrong bytes, right size
    assert fetch(hub.base_url, tmp_path) == 0
    out = capsys.readouterr().out
    assert f"{RFLOW[0]}: already present, verified (checksum computed)" in out
    assert not hub.requests("GET", RFLOW[0]) and hub.requests("GET", RFLOW[1])
    assert_installed(tmp_path)


def test_offline_rerun_trusts_earlier_verification(hub, tmp_path, capsys):
    assert fetch(hub.base_url, tmp_path) == 0
    capsys.readouterr()
    assert fetch(f"http://127.0.0.1:{closed_port()}", tmp_path) == 0
    assert capsys.readouterr().out.count("already present, verified earlier (host not reached)") == 3


# ---------------------------------------------------------------- verification


def test_wrong_announced_checksum_fails_and_leaves_nothing(hub, tmp_path, capsys):
    bad = RFLOW[1]
    hub.announce[bad] = "0" * 64
    assert fetch(hub.base_url, tmp_path) == 1
    err = capsys.readouterr().err
    assert f"checksum mismatch for {bad}: expected sha256 {'0' * 64}, got {sha(FILES[bad])}" in err
    assert "maisi.download: failed: 1 of 3 file(s) failed" in err
    assert not (tmp_path / bad).exists() and not (tmp_path / f"{bad}.part").exists()
    assert not (tmp_path / f"{bad}.sha256").exists()
    assert_installed(tmp_path, [RFLOW[0], RFLOW[2]])  # the others are not held back


def test_no_checksum_is_refused_unless_allowed(hub, tmp_path, capsys):
    hub.announce = dict.fromkeys(RFLOW)  # like a plain (non-LFS) file: no X-Linked-Etag
    assert fetch(hub.base_url, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"no checksum for {RFLOW[0]}" in err and "--allow-unverified" in err
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert fetch(hub.base_url, tmp_path, "--allow-unverified") == 0
    assert_installed(tmp_path)  # the sidecar holds the computed checksum


def test_manifest_pin_is_used_and_must_agree_with_the_host(hub, tmp_path, monkeypatch, capsys):
    manifest = json.loads((REPO / "maisi" / "resources" / "released_weights.json").read_text())
    entry = manifest["variants"]["rflow-ct"]["files"][0]
    entry.update(sha256=sha(FILES[RFLOW[0]]), size=len(FILES[RFLOW[0]]))
    monkeypatch.setattr(download, "load_manifest", lambda: manifest)
    hub.announce[RFLOW[0]] = None
    assert fetch(hub.base_url, tmp_path) == 0
    assert not hub.requests("HEAD", f"resolve/{RFLOW[0]}")  # fully pinned: nothing to ask
    assert_installed(tmp_path)

    entry.update(sha256="1" * 64, size=None)
    hub.announce[RFLOW[0]] = sha(FILES[RFLOW[0]])
    assert fetch(hub.base_url, tmp_path / "again") == 1
    assert f"now serves a different {RFLOW[0]}" in capsys.readouterr().err


# ---------------------------------------------------------------- resume


def test_resume_appends_after_a_range_request(hub, tmp_path, capsys):
    name, half = RFLOW[1], len(FILES[RFLOW[1]]) // 2
    (tmp_path / f"{name}.part").write_bytes(FILES[name][:half])
    assert fetch(hub.base_url, tmp_path) == 0
    assert hub.requests("GET", name) == [("GET", name, f"bytes={half}-", 206, len(FILES[name]) - half)]
    assert f"{name}: resuming at byte {half}" in capsys.readouterr().out
    assert_installed(tmp_path)


def test_host_ignoring_the_range_restarts_from_zero(hub, tmp_path, capsys):
    hub.honour_range = False
    name = RFLOW[0]
    (tmp_path / f"{name}.part").write_bytes(b"junk" * 1000)  # appending to it would fail the checksum
    assert fetch(hub.base_url, tmp_path) == 0
    assert hub.requests("GET", name) == [("GET", name, "bytes=4000-", 200, len(FILES[name]))]
    assert f"{name}: the host ignored the resume request; starting again from zero" in capsys.readouterr().out
    assert_installed(tmp_path)


def test_cut_transfer_keeps_the_part_and_the_next_run_resumes(hub, tmp_path, capsys):
    name = RFLOW[2]
    hub.hang_up_after[name] = 100_000
    assert fetch(hub.base_url, tmp_path) == 1
    assert f"{name}: transfer interrupted at 100000 bytes" in capsys.readouterr().err
    assert (tmp_path / f"{name}.part").stat().st_size == 100_000 and not (tmp_path / name).exists()
    assert fetch(hub.base_url, tmp_path) == 0
    assert hub.requests("GET", name)[-1][2:4] == ("bytes=100000-", 206)
    assert_installed(tmp_path)


# ---------------------------------------------------------------- the user's to fix, or the network's


def test_unreachable_host_one_clear_message_and_stop(tmp_path, capsys):
    port = closed_port()
    assert fetch(f"http://127.0.0.1:{port}", tmp_path) == 1
    captured = capsys.readouterr()
    url = f"http://127.0.0.1:{port}/{HF_REPO}/resolve/main/models/{RFLOW[0]}"
    assert f"cannot reach 127.0.0.1:{port} ({url}:" in captured.err
    assert f"download the files by hand from https://huggingface.co/{HF_REPO}/tree/main/models and put them in " \
           f"{tmp_path}" in captured.err  # fmt: skip
    assert captured.err.count("cannot reach") == 1  # the other files are not tried
    assert "0 downloaded, 0 skipped (already present), 1 failed, 2 not tried" in captured.out
    assert f"failed: 1 of 3 file(s) failed ({RFLOW[0]}), 2 not tried ({RFLOW[1]}, {RFLOW[2]})" in captured.err
    assert "Traceback" not in captured.err


def test_missing_file_is_a_404_for_the_user(hub, tmp_path, capsys):
    missing = RFLOW[2]
    del hub.files[missing]
    assert fetch(hub.base_url, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{hub.base_url}/{HF_REPO}/resolve/main/models/{missing} answered HTTP 404" in err
    assert "check --base-url" in err and "maisi.download: error: 1 of 3 file(s) failed" in err
    assert_installed(tmp_path, RFLOW[:2])


def test_unwritable_dest_and_bad_variant_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert fetch("http://127.0.0.1:9", blocker / "maisi") == 2
    assert f"cannot write to --dest {blocker / 'maisi'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--variant", "rflow-mr", "--dest", str(tmp_path)])
    assert exc.value.code == 2


def test_manifest_lists_what_the_configs_load():
    manifest = download.load_manifest()
    for variant in ("rflow-ct", "ddpm-ct"):
        files = download.variant_files(manifest, variant)
        config = json.loads((REPO / "configs" / f"inference_maisi_{variant.replace('-', '_')}.json").read_text())
        expected = sorted(Path(p).name for p in config["checkpoints"].values())
        assert sorted(f.name for f in files) == expected
        assert all(f.repo == HF_REPO and f.path == f"models/{f.name}" for f in files)
        assert all(f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in files)
