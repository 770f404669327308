"""``python -m maisi.download`` against a fake Hugging Face Hub on 127.0.0.1 (no internet, a few hundred KB
a file).

The fake speaks the part of the Hub's resolve protocol huggingface_hub uses: HEAD/GET
``/{repo}/resolve/{revision}/{path}`` answers an LFS file with a 302 to a CDN on another origin (a second
port), carrying ``X-Repo-Commit``, ``X-Linked-Etag`` (the SHA-256, quoted), ``X-Linked-Size`` and ``ETag``;
the CDN serves the bytes and honours ``Range: bytes=N-``. A non-LFS file is answered directly with a
git-SHA-1 ``ETag``. Knobs on :class:`FakeHub` make it serve other bytes, longer bodies, hang up, forget files
or refuse.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import socket
import stat
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from maisi import archive, download
from maisi.download import main

REPO = Path(__file__).resolve().parents[1]
HF_REPO = "nvidia/NV-Generate-CT"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RFLOW = (  # the rflow-ct weights: the CT networks and MAISI's mask generator
    "autoencoder_v1.pt",
    "diff_unet_3d_rflow-ct.pt",
    "controlnet_3d_rflow-ct.pt",
    "mask_generation_autoencoder.pt",
    "mask_generation_diffusion_unet.pt",
)
PINNED, TOFU = (
    RFLOW[0],
    RFLOW[1:],
)  # the tests pin the fake autoencoder; the others go through the lock file
_rng = random.Random(0)
FILES = {name: _rng.randbytes(200_000 + 50_000 * i) for i, name in enumerate(RFLOW)}
MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeHub:
    base_url: str = ""
    cdn_url: str = ""
    files: dict[str, bytes] = field(default_factory=lambda: dict(FILES))  # what the hub announces
    served: dict[str, bytes] = field(default_factory=dict)  # what the CDN serves instead, by name
    non_lfs: set[str] = field(default_factory=set)  # answered like a plain git file: no SHA-256 announced
    status: dict[str, int] = field(default_factory=dict)  # name -> HTTP error on resolve
    extra_bytes: dict[str, int] = field(default_factory=dict)  # name -> body this much longer than announced
    hang_up_after: dict[str, int] = field(default_factory=dict)  # name -> bytes sent before closing (once)
    repo_of: dict[str, str] = field(
        default_factory=dict
    )  # name -> the only repository serving it (default CT)
    log: list[dict] = field(default_factory=list)

    def requests(self, method: str, name: str, where: str = "cdn") -> list[dict]:
        return [r for r in self.log if r["method"] == method and r["name"] == name and r["where"] == where]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    where: str  # "hub" or "cdn"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _record(self, name: str, status: int, sent: int = 0) -> None:
        self.hub.log.append(
            {
                "where": self.where,
                "method": self.command,
                "name": name,
                "status": status,
                "range": self.headers.get("Range"),
                "sent": sent,
                "auth": self.headers.get("Authorization"),
            }
        )

    def _answer(self, body: bool) -> None:
        match = re.fullmatch(
            rf"/((?:nvidia|MONAI)/[\w-]+)/resolve/(main|{COMMIT})/(?:models|datasets)/([^/]+)", self.path
        )
        if self.where == "hub" and match and self.hub.repo_of.get(match.group(3), HF_REPO) == match.group(1):
            return self._resolve(match.group(3), body)
        if self.where == "cdn" and self.path.startswith("/cdn/"):
            return self._serve(self.path[5:], body)
        self._record(self.path, 404)
        self.send_error(404)

    def _resolve(self, name: str, body: bool) -> None:
        if name not in self.hub.files or name in self.hub.status:
            code = self.hub.status.get(name, 404)
            self._record(name, code)
            return self.send_error(code)
        data = self.hub.files[name]
        if name in self.hub.non_lfs:
            return self._serve(name, body, git_etag=True)
        self._record(name, 302)
        self.send_response(302)
        self.send_header("Location", f"{self.hub.cdn_url}/cdn/{name}")
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("X-Linked-Etag", f'"{sha(data)}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", f'"{sha(data)}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, name: str, body: bool, git_etag: bool = False) -> None:
        data = self.hub.served.get(name, self.hub.files.get(name))
        if data is None:
            self._record(name, 404)
            return self.send_error(404)
        data = data + bytes(self.hub.extra_bytes.get(name, 0))
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match else 0
        chunk = data[start:]
        status = 206 if start else 200
        self.send_response(status)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if git_etag:
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        sent = 0
        if body:
            chunk = chunk[
                : self.hub.hang_up_after.pop(name, len(chunk))
            ]  # HTTP/1.0: returning closes the socket
            try:
                for i in range(0, len(chunk), MiB):
                    self.wfile.write(chunk[i : i + MiB])
                    sent += len(chunk[i : i + MiB])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading
        self._record(name, status, sent)


def _serve(hub: FakeHub, where: str) -> tuple[ThreadingHTTPServer, threading.Thread, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"hub": hub, "where": where}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def hub() -> FakeHub:
    state = FakeHub()
    servers = [_serve(state, "hub"), _serve(state, "cdn")]
    state.base_url, state.cdn_url = servers[0][2], servers[1][2]  # two ports: two origins, like hub and CDN
    yield state
    for server, thread, _ in servers:
        server.shutdown()
        server.server_close()
        thread.join()


def manifest_for_tests(datasets: bool) -> dict:
    """The shipped manifest with the fake autoencoder pinned; without the mask-database files unless asked."""
    manifest = json.loads((REPO / "maisi" / "resources" / "released_weights.json").read_text())
    data = FILES[PINNED]
    manifest["pins"] = {
        f"{HF_REPO}/models/{PINNED}": {"sha256": sha(data), "size": len(data), "source": "test"}
    }
    if not datasets:  # the weights' tests below predate the database files
        for variant in manifest["variants"].values():
            variant.pop("datasets", None), variant.pop("mask_archive", None)
    return manifest


@pytest.fixture(autouse=True)
def hermetic(monkeypatch) -> None:
    """No token, mirror, offline flag or proxy from the environment; the fake autoencoder is the pinned
    file."""
    for var in (
        "HF_TOKEN",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(download.constants, "HF_HUB_OFFLINE", False)  # huggingface_hub read it when imported
    manifest = manifest_for_tests(datasets=False)
    monkeypatch.setattr(download, "load_manifest", lambda: manifest)


def fetch(base_url: str, dest: Path, *extra: str, cache: Path | None = None) -> int:
    cache = cache or dest.parent / "hf-cache"
    args = ["--variant", "rflow-ct", "--dest", str(dest), "--base-url", base_url, "--cache-dir", str(cache)]
    return main([*args, *extra])


def lock_of(dest: Path) -> dict:
    return json.loads((dest / download.LOCK_NAME).read_text())["files"]


def assert_installed(dest: Path, names=RFLOW) -> None:
    for name in names:
        assert (dest / name).read_bytes() == FILES[name], name
    assert not [p.name for p in dest.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


# ---------------------------------------------------------------- success, reuse, force


def test_downloads_records_first_use_then_verifies_reuse_without_the_host(hub, tmp_path, capsys):
    dest = tmp_path / "models" / "maisi"
    assert fetch(hub.base_url, dest) == 0
    out = capsys.readouterr().out
    assert_installed(dest)
    assert out.count("Licence:") == 1 and "NVIDIA" in out
    assert f"{len(RFLOW)} downloaded, 0 skipped (already present), 0 failed" in out
    assert sorted(p.name for p in dest.iterdir()) == sorted([*RFLOW, download.LOCK_NAME])
    lock = lock_of(dest)
    assert sorted(lock) == sorted(f"{HF_REPO}/models/{n}" for n in TOFU)  # the pinned file needs no entry
    for name in TOFU:
        entry = lock[f"{HF_REPO}/models/{name}"]
        assert entry["sha256"] == sha(FILES[name]) and entry["size"] == len(FILES[name])
        assert entry["revision"] == COMMIT and "X-Linked-Etag" in entry["source"]

    hub.log.clear()
    assert fetch(hub.base_url, dest) == 0
    out = capsys.readouterr().out
    assert (
        out.count("already present, verified against") == len(RFLOW)
        and f"0 downloaded, {len(RFLOW)} skipped" in out
    )
    assert f"{PINNED}: already present, verified against the SHA-256 pinned in" in out
    assert hub.log == []  # every reuse is verified by hashing the bytes against the pin or the lock file


def test_force_downloads_again(hub, tmp_path, capsys):
    assert fetch(hub.base_url, tmp_path / "d") == 0
    hub.log.clear()
    assert fetch(hub.base_url, tmp_path / "d", "--force") == 0
    assert f"{len(RFLOW)} downloaded, 0 skipped" in capsys.readouterr().out
    assert all(hub.requests("GET", name) for name in RFLOW)
    assert_installed(tmp_path / "d")


def test_corrupted_file_of_the_right_size_is_not_trusted(hub, tmp_path, capsys):
    dest = tmp_path / "d"
    assert fetch(hub.base_url, dest) == 0
    for name in (PINNED, TOFU[0]):  # one checked against the pin, one against the lock file
        data = bytearray((dest / name).read_bytes())
        data[1000] ^= 0xFF
        (dest / name).write_bytes(bytes(data))
    capsys.readouterr()
    assert fetch(hub.base_url, dest) == 0
    out = capsys.readouterr().out
    assert f"{PINNED}: present, but its sha256" in out and f"{TOFU[0]}: present, but its sha256" in out
    # --dest holds hard links of the cache's copies, so the cache was damaged too: found, and fetched anew
    assert out.count("the copy in the download cache is damaged") == 2
    assert f"2 downloaded, {len(RFLOW) - 2} skipped" in out
    assert_installed(dest)


def test_a_zero_filled_file_at_the_pinned_size_is_moved_aside_with_one_message(hub, tmp_path, capsys):
    dest, zeros = tmp_path / "d", bytes(len(FILES[PINNED]))
    dest.mkdir()
    (dest / PINNED).write_bytes(zeros)
    assert fetch(hub.base_url, dest) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith(f"{PINNED}:")]
    assert said == [
        f"{PINNED}: present, but every byte is zero (an incomplete or pre-allocated file), so it is not the "
        f"file the SHA-256 pinned in released_weights.json names; moved aside as {PINNED}.corrupt, "
        "downloading it again",
        f"{PINNED}: downloaded",
    ]
    assert (dest / f"{PINNED}.corrupt").read_bytes() == zeros
    assert_installed(dest)


def test_a_file_that_fails_its_hash_is_not_left_in_dest_even_when_the_download_fails(hub, tmp_path, capsys):
    name, dest = TOFU[1], tmp_path / "d"
    dest.mkdir()
    (dest / name).write_bytes(b"x" * len(FILES[name]))  # checked against the hash the host announces
    hub.served[name] = bytes(len(FILES[name]))  # and the host serves other bytes than it announces
    assert fetch(hub.base_url, dest) == 1
    captured = capsys.readouterr()
    assert f"{name}: present, but its sha256 {sha(b'x' * len(FILES[name]))}" in captured.out
    assert f"moved aside as {name}.corrupt" in captured.out
    assert f"checksum mismatch for {name}" in captured.err and "the download was deleted" in captured.err
    assert not (dest / name).exists() and (dest / f"{name}.corrupt").read_bytes() == b"x" * len(FILES[name])


def test_file_put_there_by_hand_is_checked_and_recorded_or_replaced(hub, tmp_path, capsys):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / TOFU[0]).write_bytes(FILES[TOFU[0]])  # right bytes, no lock entry
    (dest / TOFU[1]).write_bytes(b"x" * len(FILES[TOFU[1]]))  # wrong bytes, right size
    assert fetch(hub.base_url, dest) == 0
    out = capsys.readouterr().out
    assert f"{TOFU[0]}: already present, verified against the SHA-256 127.0.0.1" in out
    assert f"recorded in {download.LOCK_NAME}" in out
    assert not hub.requests("GET", TOFU[0]) and hub.requests("GET", TOFU[1])
    assert sorted(lock_of(dest)) == sorted(f"{HF_REPO}/models/{n}" for n in TOFU)
    assert_installed(dest)


# ---------------------------------------------------------------- trust


def test_host_that_later_announces_another_file_is_refused(hub, tmp_path, capsys):
    dest = tmp_path / "d"
    assert fetch(hub.base_url, dest) == 0
    (dest / TOFU[0]).unlink()
    hub.files[TOFU[0]] = b"a new release" * 1000
    hub.log.clear()
    capsys.readouterr()
    assert fetch(hub.base_url, dest) == 1
    err = capsys.readouterr().err
    assert f"now serves a different {TOFU[0]} (sha256 {sha(hub.files[TOFU[0]])}" in err
    assert f"than the SHA-256 recorded in {dest / download.LOCK_NAME}" in err
    assert "delete its entry from the lock file" in err
    assert not hub.requests("GET", TOFU[0]) and not (dest / TOFU[0]).exists()


def test_pin_that_the_host_contradicts_is_refused_before_the_transfer(hub, tmp_path, capsys):
    hub.files[PINNED] = b"not the released autoencoder"
    assert fetch(hub.base_url, tmp_path / "d") == 1
    err = capsys.readouterr().err
    assert (
        f"now serves a different {PINNED}" in err
        and "than the SHA-256 pinned in released_weights.json" in err
    )
    assert not hub.requests("GET", PINNED) and not (tmp_path / "d" / PINNED).exists()
    assert_installed(tmp_path / "d", TOFU)  # the others are not held back


def test_tampered_bytes_are_rejected_deleted_and_fetched_again_next_run(hub, tmp_path, capsys):
    name, dest = TOFU[1], tmp_path / "d"
    hub.served[name] = bytes(len(FILES[name]))  # the CDN serves other bytes of the announced size
    assert fetch(hub.base_url, dest) == 1
    err = capsys.readouterr().err
    assert f"checksum mismatch for {name}: expected sha256 {sha(FILES[name])}" in err
    assert f"maisi.download: failed: 1 of {len(RFLOW)} file(s) failed" in err
    assert not (dest / name).exists() and f"{HF_REPO}/models/{name}" not in lock_of(dest)
    assert_installed(dest, RFLOW[:2])
    del hub.served[name]  # the corrupt copy was dropped from the cache too: the next run fetches it again
    assert fetch(hub.base_url, dest) == 0
    assert_installed(dest)


def test_over_long_body_is_cut_off_and_not_installed(hub, tmp_path, capsys):
    name, dest = TOFU[0], tmp_path / "d"
    hub.extra_bytes[name] = 200 * MiB
    assert fetch(hub.base_url, dest) == 1
    assert (
        f"{name}: the host sent more than the {len(FILES[name])} bytes the file has"
        in capsys.readouterr().err
    )
    assert not (dest / name).exists()
    sent = hub.requests("GET", name)[0]["sent"]
    print(f"over-long body: {sent} bytes sent of {len(FILES[name]) + 200 * MiB} offered")
    assert sent < 60 * MiB  # stopped after about one 10 MiB chunk, not after the 200 MiB the host offered
    assert not [p for p in (tmp_path / "hf-cache").rglob("*") if p.is_file() and p.stat().st_size > MiB]


def test_non_lfs_file_has_no_checksum_and_is_refused_unless_allowed(hub, tmp_path, capsys):
    hub.non_lfs = set(RFLOW)
    dest = tmp_path / "d"
    assert fetch(hub.base_url, dest) == 2
    err = capsys.readouterr().err
    assert f"no checksum for {TOFU[0]}" in err and "--allow-unverified" in err
    assert sorted(p.name for p in dest.iterdir()) == [PINNED]  # the pin still verifies the autoencoder
    assert fetch(hub.base_url, dest, "--allow-unverified") == 0
    assert_installed(dest)
    entry = lock_of(dest)[f"{HF_REPO}/models/{TOFU[0]}"]
    assert entry["sha256"] == sha(FILES[TOFU[0]]) and entry["source"].startswith("unverified")


def test_plain_http_host_may_not_supply_checksums(tmp_path, capsys):
    dest = tmp_path / "d"
    assert fetch("http://weights-mirror.example", dest) == 2
    err = capsys.readouterr().err
    assert "--base-url http://weights-mirror.example is plain http" in err
    assert f"{', '.join(TOFU)} would be verified against the hash that host announces" in err
    assert not dest.exists()  # nothing created
    for url in ("https://mirror.example", "http://127.0.0.5:8000", "http://localhost:1", "http://[::1]:80"):
        assert download.may_announce_hash(url), url
    assert not download.may_announce_hash("http://10.0.0.1")
    files = [download.RemoteFile(HF_REPO, f"models/{PINNED}")]
    pins = download.manifest_pins(download.load_manifest())
    download.check_transport(
        files, pins, download.Lock(dest), "http://weights-mirror.example"
    )  # pinned: fine


def test_token_is_sent_to_huggingface_only(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    assert fetch(hub.base_url, tmp_path / "d") == 0
    assert hub.log and not [r for r in hub.log if r["auth"]]
    assert download.token_for("https://huggingface.co") is None  # huggingface_hub sends the user's token
    assert download.token_for("https://hf-mirror.com") is False


def test_hf_endpoint_is_the_default_base_url(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.base_url)
    args = ["--variant", "rflow-ct", "--dest", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    assert f"{len(RFLOW)} downloaded" in capsys.readouterr().out and hub.requests("HEAD", PINNED, "hub")
    assert_installed(tmp_path / "d")


# ---------------------------------------------------------------- offline, the user's to fix, the network's


def test_offline_rerun_and_hf_hub_offline(hub, tmp_path, capsys, monkeypatch):
    dest, cache = tmp_path / "d", tmp_path / "hf-cache"
    assert fetch(hub.base_url, dest) == 0
    capsys.readouterr()
    assert (
        fetch(f"http://127.0.0.1:{closed_port()}", dest) == 0
    )  # verified against pin and lock, host not needed
    assert capsys.readouterr().out.count("already present, verified") == len(RFLOW)

    (
        dest / TOFU[0]
    ).unlink()  # host unreachable: huggingface_hub's cached copy, checked against the lock file
    assert fetch(f"http://127.0.0.1:{closed_port()}", dest) == 0
    assert f"{TOFU[0]}: downloaded" in capsys.readouterr().out

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (dest / TOFU[1]).unlink()
    hub.log.clear()
    assert fetch(hub.base_url, dest) == 0  # taken from huggingface_hub's cache, checked against the lock file
    assert hub.log == [] and capsys.readouterr().out.count("downloaded") == 2
    assert_installed(dest)

    assert fetch(hub.base_url, tmp_path / "elsewhere", cache=tmp_path / "empty-cache") == 2
    err = capsys.readouterr().err
    assert f"HF_HUB_OFFLINE is set and {PINNED} is neither in" in err
    assert f"no checksum for {TOFU[0]}" in err and hub.log == [] and cache.exists()


def test_unreachable_host_one_clear_message_and_stop(tmp_path, capsys):
    port = closed_port()
    assert fetch(f"http://127.0.0.1:{port}", tmp_path / "d") == 1
    captured = capsys.readouterr()
    assert captured.err.count("cannot reach") == 1  # the other files are not tried
    assert (
        f"cannot reach 127.0.0.1:{port} (http://127.0.0.1:{port}/{HF_REPO}/resolve/main/models/{PINNED}:"
        in (captured.err)
    )
    assert (
        f"download the files by hand from https://huggingface.co/{HF_REPO}/tree/main/models" in captured.err
    )
    assert f"0 downloaded, 0 skipped (already present), 1 failed, {len(TOFU)} not tried" in captured.out
    assert (
        f"failed: 1 of {len(RFLOW)} file(s) failed ({PINNED}), {len(TOFU)} not tried ({', '.join(TOFU)})"
        in captured.err
    )
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    "code, says", [(404, "the file is not there; check --base-url"), (403, "the repository may be gated")]
)
def test_missing_or_refused_file_is_the_users_to_fix(hub, tmp_path, capsys, code, says):
    hub.status[TOFU[1]] = code
    assert fetch(hub.base_url, tmp_path / "d") == 2
    err = capsys.readouterr().err
    assert f"{hub.base_url}/{HF_REPO}/resolve/main/models/{TOFU[1]} answered HTTP {code}: {says}" in err
    assert f"maisi.download: error: 1 of {len(RFLOW)} file(s) failed" in err
    assert_installed(tmp_path / "d", RFLOW[:2])


def test_broken_transfer_is_resumed_within_the_run(hub, tmp_path):
    name, data = TOFU[1], random.Random(1).randbytes(12 * MiB)  # resumes count whole 10 MiB chunks
    hub.files[name] = data
    hub.hang_up_after[name] = 11 * MiB
    assert fetch(hub.base_url, tmp_path / "d") == 0
    gets = hub.requests("GET", name)
    assert [(g["range"], g["status"]) for g in gets] == [(None, 200), (f"bytes={10 * MiB}-", 206)]
    assert (tmp_path / "d" / name).read_bytes() == data


class _Terminal(io.StringIO):
    """stderr as a terminal: the download bar (tqdm ``disable=None``) shows only on one."""

    def isatty(self) -> bool:
        return True


def _bar_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if "%|" in line or "B/s" in line]


def test_no_progress_silences_the_download_bar(hub, tmp_path, monkeypatch):
    shown, quiet = _Terminal(), _Terminal()
    monkeypatch.setattr(sys, "stderr", shown)
    assert fetch(hub.base_url, tmp_path / "shown") == 0
    assert any(PINNED in line for line in _bar_lines(shown.getvalue())), shown.getvalue()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert fetch(hub.base_url, tmp_path / "quiet", "--no-progress", cache=tmp_path / "cache2") == 0
    assert all(len(hub.requests("GET", name)) == 2 for name in RFLOW)  # downloaded again, not linked
    assert _bar_lines(quiet.getvalue()) == [], quiet.getvalue()
    assert_installed(tmp_path / "quiet")


def test_unwritable_dest_bad_lock_and_bad_variant_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert fetch("http://127.0.0.1:9", blocker / "maisi") == 2
    assert f"cannot write to --dest {blocker / 'maisi'}" in capsys.readouterr().err
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / download.LOCK_NAME).write_text("{not json")
    assert fetch("http://127.0.0.1:9", dest) == 2
    assert f"cannot read the lock file {dest / download.LOCK_NAME}" in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == [download.LOCK_NAME]
    with pytest.raises(SystemExit) as exc:
        main(["--variant", "rflow-pet", "--dest", str(tmp_path)])
    assert exc.value.code == 2


def test_shipped_manifest_lists_the_mask_database_of_each_variant():
    manifest = json.loads((REPO / "maisi" / "resources" / "released_weights.json").read_text())
    for variant, n in (("rflow-ct", 4000), ("ddpm-ct", 3000)):
        files = download.variant_files(manifest, variant, datasets=True, mask_archive=True)
        files = [f for f in files if not f.path.startswith("models/")]
        assert [f.local for f in files] == [
            f"datasets/candidate_masks_flexible_size_and_spacing_{n}.json",
            "datasets/all_anatomy_size_conditions.json",
            # MAISI's ddpm-ct environment too reads its _3000 database's masks from the _4000 archive
            "datasets/all_masks_flexible_size_and_spacing_4000.zip",
        ]
        assert all(f.path == f.local and f.repo == HF_REPO for f in files)
        assert manifest["variants"][variant]["mask_archive"]["extract_to"] == (
            "datasets/all_masks_flexible_size_and_spacing_4000"
        )


def test_shipped_manifest_lists_what_the_configs_load_and_sourced_pins():
    manifest = json.loads((REPO / "maisi" / "resources" / "released_weights.json").read_text())
    for variant in ("rflow-ct", "ddpm-ct"):
        files = download.variant_files(manifest, variant)
        config = json.loads(
            (REPO / "configs" / f"inference_maisi_{variant.replace('-', '_')}.json").read_text()
        )
        # the CT networks the config loads, and MAISI's mask generator (one for both variants)
        expected = [Path(p).name for p in config["checkpoints"].values()] + [
            "mask_generation_autoencoder.pt",
            "mask_generation_diffusion_unet.pt",
        ]
        assert sorted(f.name for f in files) == sorted(set(expected))
        assert all(f.repo == HF_REPO and f.path == f"models/{f.name}" for f in files)
    pins = download.manifest_pins(manifest)
    mr_vae = "nvidia/NV-Generate-MR/models/autoencoder_v2.pt"
    assert set(pins) == {f"{HF_REPO}/models/autoencoder_v1.pt", mr_vae}
    assert pins[mr_vae].sha256 == "b5ed556dc64872cae11ebe67cc33e84fbd05ebdf7e35e40c74d956404e7c1ef0"
    assert all(len(pin["source"]) > 40 for pin in manifest["pins"].values())  # says where the hash comes from


# ---------------------------------------------------------------- the MR variants

MR_REPOS = {
    "autoencoder_v2.pt": "nvidia/NV-Generate-MR",
    "diff_unet_3d_rflow-mr.pt": "nvidia/NV-Generate-MR",
    "diff_unet_3d_rflow-mr-brain_v1.pt": "nvidia/NV-Generate-MR-Brain",
}


def test_shipped_manifest_lists_the_mr_variants_as_maisi_and_the_configs_load_them():
    """As NV-Generate-CTMR scripts/download_model_data.py: rflow-mr from NV-Generate-MR; rflow-mr-brain is
    the CT autoencoder_v1 with the brain UNet from NV-Generate-MR-Brain. Weights only; of the MR files only
    the VAE has a published SHA-256, so only it is pinned (the UNets: TOFU)."""
    manifest = json.loads((REPO / "maisi" / "resources" / "released_weights.json").read_text())
    expected = {
        "rflow-mr": [
            ("nvidia/NV-Generate-MR", "autoencoder_v2.pt"),
            ("nvidia/NV-Generate-MR", "diff_unet_3d_rflow-mr.pt"),
        ],
        "rflow-mr-brain": [
            ("nvidia/NV-Generate-CT", "autoencoder_v1.pt"),
            ("nvidia/NV-Generate-MR-Brain", "diff_unet_3d_rflow-mr-brain_v1.pt"),
        ],
    }
    for variant, files in expected.items():
        listed = download.variant_files(manifest, variant, datasets=True, mask_archive=True)
        assert [(f.repo, f.name) for f in listed] == files
        assert all(f.path == f"models/{f.name}" and f.local == f.name for f in listed)
        config = json.loads(
            (REPO / "configs" / f"inference_maisi_{variant.replace('-', '_')}.json").read_text()
        )
        assert sorted(Path(p).name for p in config["checkpoints"].values()) == sorted(n for _, n in files)
    mr_pins = [k for k in manifest["pins"] if k.startswith("nvidia/NV-Generate-MR")]
    assert mr_pins == ["nvidia/NV-Generate-MR/models/autoencoder_v2.pt"]  # the one with a published record


def test_mr_brain_variant_fetches_from_two_repositories_and_locks_each(hub, tmp_path, capsys):
    hub.files.update({name: _rng.randbytes(100_000) for name in MR_REPOS})
    hub.repo_of.update(MR_REPOS)
    dest = tmp_path / "d"
    args = ["--dest", str(dest), "--base-url", hub.base_url, "--cache-dir", str(tmp_path / "c")]
    assert main(["--variant", "rflow-mr-brain", *args, "--with-mask-archive"]) == 0
    out = capsys.readouterr().out
    assert (
        "https://huggingface.co/nvidia/NV-Generate-CT, https://huggingface.co/nvidia/NV-Generate-MR-Brain"
        in out
    )
    assert "rflow-mr-brain -> " in out and "2 downloaded, 0 skipped" in out  # no database, no archive
    assert "rflow-mr-brain has no mask archive" in out
    assert (dest / "autoencoder_v1.pt").read_bytes() == FILES["autoencoder_v1.pt"]  # the CT VAE, pinned
    brain = "diff_unet_3d_rflow-mr-brain_v1.pt"
    assert (dest / brain).read_bytes() == hub.files[brain]
    assert sorted(lock_of(dest)) == [f"nvidia/NV-Generate-MR-Brain/models/{brain}"]

    assert main(["--variant", "rflow-mr", *args]) == 0
    assert "2 downloaded" in capsys.readouterr().out
    lock = lock_of(dest)
    for name in ("autoencoder_v2.pt", "diff_unet_3d_rflow-mr.pt"):
        assert (dest / name).read_bytes() == hub.files[name]
        assert lock[f"nvidia/NV-Generate-MR/models/{name}"]["sha256"] == sha(hub.files[name])


def test_mr_file_served_from_the_wrong_repository_is_not_found(hub, tmp_path, capsys):
    hub.files.update({name: _rng.randbytes(1000) for name in MR_REPOS})
    hub.repo_of.update(MR_REPOS, **{"diff_unet_3d_rflow-mr.pt": "nvidia/NV-Generate-CT"})
    args = ["--dest", str(tmp_path / "d"), "--base-url", hub.base_url, "--cache-dir", str(tmp_path / "c")]
    assert main(["--variant", "rflow-mr", *args]) == 2
    assert (
        "NV-Generate-MR/resolve/main/models/diff_unet_3d_rflow-mr.pt answered HTTP 404"
        in capsys.readouterr().err
    )


# ---------------------------------------------------------------- the mask database and its archive

DB_JSON = "candidate_masks_flexible_size_and_spacing_4000.json"
SIZES_JSON = "all_anatomy_size_conditions.json"
ARCHIVE = "all_masks_flexible_size_and_spacing_4000.zip"
MASKS = {"ds1/case1_label.nii.gz": b"mask one" * 500, "ds2/sub/case2_label.nii.gz": b"mask two" * 700}


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    symlinks = symlinks or {}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in symlinks.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


MASK_ZIP = make_zip({f"all_masks_flexible_size_and_spacing_4000/{k}": v for k, v in MASKS.items()})


@pytest.fixture
def database(hub, monkeypatch) -> FakeHub:
    """The hub also serves the database files and a small mask archive; the manifest lists them."""
    manifest = manifest_for_tests(datasets=True)
    monkeypatch.setattr(download, "load_manifest", lambda: manifest)
    hub.files.update({DB_JSON: b'[{"pseudo_label_filename": "./ds1/case1_label.nii.gz"}]', SIZES_JSON: b"[]"})
    hub.files[ARCHIVE] = MASK_ZIP
    return hub


def extracted(dest: Path) -> dict[str, bytes]:
    folder = dest / "datasets" / "all_masks_flexible_size_and_spacing_4000"
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_database_files_come_with_the_weights_archive_only_when_asked(database, tmp_path, capsys):
    dest = tmp_path / "d"
    assert fetch(database.base_url, dest) == 0
    out = capsys.readouterr().out
    assert f"{len(RFLOW) + 2} downloaded, 0 skipped" in out and f"datasets/{DB_JSON}: downloaded" in out
    assert (dest / "datasets" / DB_JSON).read_bytes() == database.files[DB_JSON]
    assert (dest / "datasets" / SIZES_JSON).read_bytes() == b"[]"
    assert f"{HF_REPO}/datasets/{DB_JSON}" in lock_of(dest)  # checked like the weights (trust on first use)
    assert not database.requests("GET", ARCHIVE) and not database.requests("HEAD", ARCHIVE, "hub")
    assert not (dest / "datasets" / "all_masks_flexible_size_and_spacing_4000").exists()

    assert fetch(database.base_url, tmp_path / "w", "--weights-only") == 0
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted([*RFLOW, download.LOCK_NAME])


def test_mask_archive_is_verified_then_extracted_where_the_database_expects_it(database, tmp_path, capsys):
    dest = tmp_path / "d"
    assert fetch(database.base_url, dest, "--with-mask-archive") == 0
    out = capsys.readouterr().out
    assert f"datasets/{ARCHIVE}: extracted 2 files" in out and f"{len(RFLOW) + 3} downloaded" in out
    assert f"{HF_REPO}/datasets/{ARCHIVE}" in lock_of(dest)
    files = extracted(dest)
    # the zip's top folder is not repeated, and no temporary folder is left
    assert {k: v for k, v in files.items() if k != archive.MARKER} == MASKS
    assert not [p for p in (dest / "datasets").iterdir() if p.name.startswith(".")]

    mtime = (dest / "datasets" / "all_masks_flexible_size_and_spacing_4000" / "ds1/case1_label.nii.gz").stat()
    assert fetch(database.base_url, dest, "--with-mask-archive") == 0
    assert "already extracted in" in capsys.readouterr().out
    case1 = dest / "datasets" / "all_masks_flexible_size_and_spacing_4000" / "ds1/case1_label.nii.gz"
    assert case1.stat().st_mtime_ns == mtime.st_mtime_ns  # nothing extracted again

    case1.write_bytes(b"truncated")  # a damaged extraction is noticed by name and size and redone
    assert fetch(database.base_url, dest, "--with-mask-archive") == 0
    assert f"datasets/{ARCHIVE}: extracted 2 files" in capsys.readouterr().out
    assert case1.read_bytes() == MASKS["ds1/case1_label.nii.gz"]


def test_hostile_archive_is_refused_whole_and_nothing_is_extracted(database, tmp_path, capsys):
    dest = tmp_path / "models" / "maisi"
    database.files[ARCHIVE] = make_zip(
        {"ds1/ok.nii.gz": b"fine", "../../escaped.txt": b"x", "/abs.txt": b"x", "ds1/ok.nii.gz.": b"x"},
        symlinks={"ds1/link": "/etc/passwd"},
    )
    assert fetch(database.base_url, dest, "--with-mask-archive") == 1
    err = capsys.readouterr().err
    assert f"{ARCHIVE} holds 3 unsafe member(s): '../../escaped.txt' (a '..' component" in err
    assert "'/abs.txt' (an absolute path)" in err and "'ds1/link' (a symbolic link)" in err
    assert "nothing was extracted" in err
    assert f"failed: 1 of {len(RFLOW) + 3} file(s) failed (datasets/{ARCHIVE} (extraction))" in err
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "models" / "escaped.txt").exists()
    assert sorted(p.name for p in (dest / "datasets").iterdir()) == sorted([DB_JSON, SIZES_JSON, ARCHIVE])


def test_archive_without_a_top_folder_extracts_into_the_target(tmp_path):
    zip_path = tmp_path / "a.zip"
    zip_path.write_bytes(make_zip(MASKS))
    target = tmp_path / "datasets" / "all_masks_flexible_size_and_spacing_4000"
    assert archive.extract_archive(zip_path, target, "0" * 64).startswith("extracted 2 files")
    assert {k: v for k, v in extracted(tmp_path).items() if k != archive.MARKER} == MASKS
    assert archive.extract_archive(zip_path, target, "0" * 64).startswith("already extracted")
    assert archive.extract_archive(zip_path, target, "1" * 64).startswith("extracted")  # another archive


def test_damaged_archive_fails_and_keeps_nothing(tmp_path):
    data = bytearray(make_zip(MASKS))
    data[60:80] = bytes(20)  # inside the first member's compressed bytes: its CRC no longer matches
    zip_path = tmp_path / "a.zip"
    zip_path.write_bytes(bytes(data))
    target = tmp_path / "out" / "masks"
    with pytest.raises(download.RunFailure, match="a.zip is damaged"):
        archive.extract_archive(zip_path, target, "0" * 64)
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- the seeds' LDMs: published MD5, SHA-256

BRATS_2D = "MONAI/brats_mri_axial_slices_generative_diffusion"
CXR = "MONAI/cxr_image_synthesis_latent_diffusion_model"
SEED_FILES = {  # name -> (repository, fake bytes)
    "model_autoencoder.pt": (BRATS_2D, _rng.randbytes(120_000)),
    "model.pt": (BRATS_2D, _rng.randbytes(130_000)),
    "autoencoder.pth": (CXR, _rng.randbytes(110_000)),
    "diffusion_model.pth": (CXR, _rng.randbytes(140_000)),
}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def seed_hub(hub, monkeypatch) -> FakeHub:
    """The fake hub serving the brats-2d and cxr files; the manifest publishes the fake brats-2d MD5s."""
    for name, (repo, data) in SEED_FILES.items():
        hub.files[name], hub.repo_of[name] = data, repo
    manifest = manifest_for_tests(datasets=False)
    manifest["published_md5"] = {
        f"{BRATS_2D}/models/{name}": {"md5": md5(SEED_FILES[name][1]), "source": "the test's large_files.yml"}
        for name in ("model_autoencoder.pt", "model.pt")
    }
    monkeypatch.setattr(download, "load_manifest", lambda: manifest)
    return hub


def fetch_seed(hub: FakeHub, variant: str, dest: Path, *extra: str) -> int:
    args = ["--dest", str(dest), "--base-url", hub.base_url, "--cache-dir", str(dest.parent / "hf-cache")]
    return main(["--variant", variant, *args, *extra])


def test_published_md5_match_is_installed_and_its_sha256_pinned(seed_hub, tmp_path, capsys):
    dest = tmp_path / "seeds"
    assert fetch_seed(seed_hub, "brats-2d", dest) == 0
    out = capsys.readouterr().out
    assert "Licence: The MONAI model-zoo bundles' weights" in out and "2 downloaded" in out
    lock = lock_of(dest)
    for name in ("model_autoencoder.pt", "model.pt"):
        assert (dest / "brats-2d" / name).read_bytes() == SEED_FILES[name][1]  # a subfolder per variant
        entry = lock[f"{BRATS_2D}/models/{name}"]
        assert entry["sha256"] == sha(SEED_FILES[name][1])
        assert entry["source"].startswith("the MD5 published in the test's large_files.yml, checked")
    seed_hub.log.clear()
    assert fetch_seed(seed_hub, "brats-2d", dest) == 0  # later runs: the SHA-256, without the host
    assert capsys.readouterr().out.count("verified against the SHA-256 recorded in") == 2
    assert seed_hub.log == []


def test_published_md5_mismatch_is_refused_whatever_the_host_announces(seed_hub, tmp_path, capsys):
    other = _rng.randbytes(130_000)
    seed_hub.files["model.pt"] = other  # the host announces, and serves, other bytes consistently
    dest = tmp_path / "seeds"
    assert fetch_seed(seed_hub, "brats-2d", dest) == 1
    err = capsys.readouterr().err
    assert f"checksum mismatch for model.pt: expected md5 {md5(SEED_FILES['model.pt'][1])}" in err
    assert "(the MD5 published in the test's large_files.yml), got " + md5(other) in err
    assert not (dest / "brats-2d" / "model.pt").exists()
    assert f"{BRATS_2D}/models/model.pt" not in lock_of(dest)  # nothing pinned from refused bytes
    assert (dest / "brats-2d" / "model_autoencoder.pt").is_file()  # the other file is not held back


def test_published_md5_verifies_a_file_put_there_by_hand_and_a_file_without_announced_hash(
    seed_hub, tmp_path, capsys
):
    dest = tmp_path / "seeds"
    (dest / "brats-2d").mkdir(parents=True)
    (dest / "brats-2d" / "model_autoencoder.pt").write_bytes(SEED_FILES["model_autoencoder.pt"][1])
    seed_hub.non_lfs = {"model.pt"}  # no SHA-256 announced: the MD5 is enough, no --allow-unverified
    assert fetch_seed(seed_hub, "brats-2d", dest) == 0
    out = capsys.readouterr().out
    assert "model_autoencoder.pt: already present, verified against the MD5 published in" in out
    assert not seed_hub.requests("GET", "model_autoencoder.pt")
    lock = lock_of(dest)
    assert {k: v["sha256"] for k, v in lock.items()} == {
        f"{BRATS_2D}/models/{n}": sha(SEED_FILES[n][1]) for n in ("model_autoencoder.pt", "model.pt")
    }
    download.check_transport(  # published MD5s need no hash from a plain-http host
        download.variant_files(download.load_manifest(), "brats-2d"),
        {},
        download.Lock(tmp_path / "empty"),
        "http://weights-mirror.example",
        download.manifest_md5s(download.load_manifest()),
    )


def test_cxr_has_no_published_hash_and_is_pinned_on_first_use(seed_hub, tmp_path, capsys):
    dest = tmp_path / "seeds"
    assert fetch_seed(seed_hub, "cxr", dest) == 0
    lock = lock_of(dest)
    for name in ("autoencoder.pth", "diffusion_model.pth"):
        assert (dest / "cxr" / name).read_bytes() == SEED_FILES[name][1]
        entry = lock[f"{CXR}/models/{name}"]
        assert entry["sha256"] == sha(SEED_FILES[name][1]) and "X-Linked-Etag" in entry["source"]
    seed_hub.files["diffusion_model.pth"] = b"a retrained model" * 1000
    (dest / "cxr" / "diffusion_model.pth").unlink()
    capsys.readouterr()
    assert fetch_seed(seed_hub, "cxr", dest) == 1  # the pin holds from then on
    assert "now serves a different diffusion_model.pth" in capsys.readouterr().err


def test_shipped_manifest_lists_the_seed_variants_with_their_published_md5s():
    manifest = json.loads((REPO / "maisi" / "resources" / "released_weights.json").read_text())
    md5s = download.manifest_md5s(manifest)
    expected = {
        "brats-2d": (BRATS_2D, ("model_autoencoder.pt", "model.pt")),
        "brats-3d": ("MONAI/brats_mri_generative_diffusion", ("model_autoencoder.pt", "model.pt")),
        "cxr": (CXR, ("autoencoder.pth", "diffusion_model.pth")),
    }
    for variant, (repo, names) in expected.items():
        files = download.variant_files(manifest, variant, datasets=True, mask_archive=True)
        assert [(f.repo, f.path, f.local) for f in files] == [
            (repo, f"models/{n}", f"{variant}/{n}") for n in names
        ]
        assert all((f.key in md5s) == (variant != "cxr") for f in files)  # cxr publishes no hash
    assert md5s[f"{BRATS_2D}/models/model.pt"].md5 == "93a19ea3eaafd9781b4140286b121f37"
    assert md5s["MONAI/brats_mri_generative_diffusion/models/model_autoencoder.pt"].md5 == (
        "9e6df4cc9a2decf49ab3332606b32c55"
    )
    assert not any(k.startswith("MONAI/") for k in manifest["pins"])  # no SHA-256 is published
