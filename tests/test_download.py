"""Tests of stlib.io.download against real HTTP servers on 127.0.0.1 (no outside network)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import socket
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from stlib.io import download as dl
from stlib.io.download import (
    DownloadError,
    download_file,
    download_hest,
    download_pannuke,
    hest_allow_patterns,
    pannuke_sources,
)
from stlib.utils import InputError

FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"


# --------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------

class _FileHandler(BaseHTTPRequestHandler):
    """Serves files of ``server.root``; optional Range support and deliberate connection drops."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Range")))
        f = srv.root / self.path.lstrip("/")
        if not f.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = f.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if srv.support_range and rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops > 0:  # send a prefix, then cut the connection
            srv.drops -= 1
            self.wfile.write(body[: srv.drop_after])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)


class _GatedHubHandler(BaseHTTPRequestHandler):
    """A Hub that refuses everything as a gated repo and (maliciously) echoes the credentials.

    The echo is in the JSON body, which huggingface_hub puts into its exception message; it is
    not in a header, since httpcore logs response headers at DEBUG level (outside stlib's reach).
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _refuse(self) -> None:
        auth = self.headers.get("Authorization", "")
        self.server.seen.append((self.path, auth))
        body = json.dumps({"error": f"Access to dataset is restricted; you sent {auth}"}).encode()
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _refuse  # noqa: N815
    do_HEAD = _refuse  # noqa: N815


def _serve(handler, **attrs):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.seen = []
    for k, v in attrs.items():
        setattr(httpd, k, v)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return httpd, t


@pytest.fixture(autouse=True)
def _no_proxy_fast_retry(monkeypatch, tmp_path):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no cached login of the real user


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    httpd, t = _serve(_FileHandler, root=root, support_range=True, drops=0, drop_after=0)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    t.join(5)


def _payload(tmp_root: Path, name: str = "blob.bin", n: int = 300_000) -> tuple[bytes, str]:
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    (tmp_root / name).write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# download_file
# --------------------------------------------------------------------------------------------

def test_full_download_with_sha256(server, tmp_path):
    data, h = _payload(server.root)
    dest = tmp_path / "out" / "blob.bin"
    assert download_file(f"{server.url}/blob.bin", dest, sha256=h, chunk_size=16384) == dest
    assert dest.read_bytes() == data
    assert not (tmp_path / "out" / "blob.bin.part").exists()
    assert server.seen == [("/blob.bin", None)]


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    data, h = _payload(server.root)
    server.drops, server.drop_after = 1, 100_000
    dest = tmp_path / "blob.bin"
    download_file(f"{server.url}/blob.bin", dest, sha256=h, chunk_size=8192, retries=2)
    assert dest.read_bytes() == data
    assert len(server.seen) == 2
    assert server.seen[0][1] is None
    m = re.fullmatch(r"bytes=(\d+)-", server.seen[1][1] or "")
    assert m is not None, server.seen
    assert 0 < int(m.group(1)) <= 100_000  # resumed from what reached the .part
    assert not dest.with_name("blob.bin.part").exists()


def test_resume_from_existing_part_file(server, tmp_path):
    data, h = _payload(server.root)
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(data[:12345])  # left by an earlier, killed run
    download_file(f"{server.url}/blob.bin", dest, sha256=h)
    assert dest.read_bytes() == data
    assert server.seen == [("/blob.bin", "bytes=12345-")]


def test_complete_part_file_is_finished_after_416(server, tmp_path):
    data, h = _payload(server.root)
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(data)  # killed between last byte and rename
    download_file(f"{server.url}/blob.bin", dest, sha256=h)
    assert dest.read_bytes() == data
    assert server.seen == [("/blob.bin", f"bytes={len(data)}-")]


def test_server_without_range_restarts(server, tmp_path):
    data, h = _payload(server.root)
    server.support_range = False
    server.drops, server.drop_after = 1, 50_000
    dest = tmp_path / "blob.bin"
    download_file(f"{server.url}/blob.bin", dest, sha256=h, chunk_size=8192)
    assert dest.read_bytes() == data  # not the 50 kB prefix followed by the whole file again
    assert len(server.seen) == 2 and server.seen[1][1] is not None  # asked to resume, got 200


def test_corrupted_download_is_deleted(server, tmp_path):
    _payload(server.root)
    wrong = "0" * 64
    dest = tmp_path / "blob.bin"
    url = f"{server.url}/blob.bin"
    with pytest.raises(DownloadError) as ei:
        download_file(url, dest, sha256=wrong)
    msg = str(ei.value)
    actual = hashlib.sha256((server.root / "blob.bin").read_bytes()).hexdigest()
    for part in (url, str(dest), wrong, actual):
        assert part in msg
    assert not dest.exists()
    assert not dest.with_name("blob.bin.part").exists()


def test_idempotent_rerun_does_not_hit_server(server, tmp_path):
    data, h = _payload(server.root)
    dest = tmp_path / "blob.bin"
    download_file(f"{server.url}/blob.bin", dest, sha256=h)
    download_file(f"{server.url}/blob.bin", dest, sha256=h)
    download_file(f"{server.url}/blob.bin", dest)
    assert len(server.seen) == 1
    dest.write_bytes(b"stale")  # a mismatching file is fetched again and replaced
    download_file(f"{server.url}/blob.bin", dest, sha256=h)
    assert len(server.seen) == 2 and dest.read_bytes() == data


def test_gives_up_after_retries_and_keeps_part(server, tmp_path):
    _payload(server.root)
    server.drops, server.drop_after = 10, 1000
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="did not complete after 2 attempt"):
        download_file(f"{server.url}/blob.bin", dest, retries=1, chunk_size=512)
    assert len(server.seen) == 2
    assert not dest.exists()
    assert dest.with_name("blob.bin.part").exists()  # kept: the next run resumes from it


def test_http_404_is_an_error_without_retries(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.url}/nope.zip", tmp_path / "nope.zip", retries=3)
    assert len(server.seen) == 1
    assert not (tmp_path / "nope.zip").exists()


def test_bad_sha256_argument(tmp_path):
    with pytest.raises(InputError, match="64 hex"):
        download_file("http://127.0.0.1:9/x", tmp_path / "x", sha256="abc")


def test_cli_url(server, tmp_path, capsys):
    from stlib.cli import main

    data, h = _payload(server.root)
    dest = tmp_path / "cli.bin"
    assert main(["download", "url", f"{server.url}/blob.bin", "--out", str(dest), "--sha256", h]) == 0
    assert dest.read_bytes() == data
    assert str(dest) in capsys.readouterr().out
    assert main(["download", "url", f"{server.url}/blob.bin", "--out", str(tmp_path / "bad.bin"),
                 "--sha256", "f" * 64]) == 1
    assert "SHA-256 mismatch" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# HEST-1k
# --------------------------------------------------------------------------------------------

HEST_FILES_OF = {
    "TENX95": ["wsis/TENX95.tif", "metadata/TENX95.json", "transcripts/TENX95_transcripts.parquet",
               "xenium_seg/TENX95_xenium_nucleus_seg.parquet", "cellvit_seg/TENX95_cellvit_seg.parquet"],
}


def _fake_hest_tree() -> list[str]:
    files = ["HEST_v1_1_0.csv", "README.md"]
    for i in ("TENX95", "TENX950", "NCBI783", "XTENX95"):
        files += [t.format(id=i) for t in dl.HEST_KINDS.values()]
        files += [f"st/{i}.h5ad", f"patches/{i}.h5", f"thumbnails/{i}_downscaled_fullres.jpeg",
                  f"xenium_seg/{i}_xenium_cell_seg.parquet", f"transcripts/{i}_transcripts.parquet.bak"]
    return files


def _make_mirror(root: Path, files: list[str]) -> None:
    for f in files:
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"content of {f}".encode())


def test_allow_patterns_select_exactly_the_sample_files():
    from huggingface_hub.utils import filter_repo_objects

    pats = hest_allow_patterns(["TENX95"])
    got = set(filter_repo_objects(_fake_hest_tree(), allow_patterns=pats))
    assert got == {"HEST_v1_1_0.csv", *HEST_FILES_OF["TENX95"]}
    pats = hest_allow_patterns(["TENX95", "NCBI783"], kinds=("metadata", "wsis"))
    got = set(filter_repo_objects(_fake_hest_tree(), allow_patterns=pats))
    assert got == {"HEST_v1_1_0.csv", "metadata/TENX95.json", "wsis/TENX95.tif",
                   "metadata/NCBI783.json", "wsis/NCBI783.tif"}
    with pytest.raises(InputError):
        hest_allow_patterns(["TENX*"])
    with pytest.raises(InputError, match="unknown HEST file kind"):
        hest_allow_patterns(["TENX95"], kinds=("st",))


def test_hest_mirror_copies_exactly_the_per_id_files(tmp_path, caplog):
    mirror, out = tmp_path / "mirror", tmp_path / "data" / "hest"
    _make_mirror(mirror, _fake_hest_tree())
    assert download_hest(["TENX95"], out, mirror=mirror) == out
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert got == {"HEST_v1_1_0.csv", *HEST_FILES_OF["TENX95"]}
    assert (out / "wsis/TENX95.tif").read_bytes() == b"content of wsis/TENX95.tif"

    # files missing in the mirror are reported per sample
    (mirror / "transcripts/NCBI783_transcripts.parquet").unlink()
    (mirror / "wsis/NCBI783.tif").unlink()
    with pytest.raises(DownloadError) as ei:
        download_hest(["TENX95", "NCBI783"], out, mirror=mirror)
    msg = str(ei.value)
    assert "NCBI783: wsis/NCBI783.tif, transcripts/NCBI783_transcripts.parquet" in msg
    assert "TENX95:" not in msg and "--allow-missing" in msg
    with caplog.at_level(logging.WARNING, logger="stlib.io.download"):
        download_hest(["TENX95", "NCBI783"], out, mirror=mirror, allow_missing=True)
    assert "NCBI783_transcripts" in caplog.text
    assert (out / "metadata/NCBI783.json").is_file()
    with pytest.raises(InputError, match="mirror folder not found"):
        download_hest(["TENX95"], out, mirror=tmp_path / "nowhere")


def test_cli_hest_mirror(tmp_path, capsys):
    from stlib.cli import main

    mirror, out = tmp_path / "mirror", tmp_path / "hest"
    _make_mirror(mirror, _fake_hest_tree())
    rc = main(["download", "hest", "--ids", "TENX95", "--out", str(out), "--mirror", str(mirror),
               "--kinds", "wsis", "metadata"])
    assert rc == 0
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert got == {"HEST_v1_1_0.csv", "wsis/TENX95.tif", "metadata/TENX95.json"}


def _forbid_hub(monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("the Hub must not be contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", boom)


def _one_sentence(msg: str) -> bool:
    return "\n" not in msg and len(re.findall(r"[.!?](?:\s|$)", msg)) == 1 and msg.endswith(".")


def test_hest_offline_env_gives_one_sentence(tmp_path, monkeypatch):
    _forbid_hub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as ei:
        download_hest(["TENX95"], tmp_path / "hest")
    msg = str(ei.value)
    assert _one_sentence(msg), msg
    assert "TENX95" in msg and "--mirror" in msg and "network" in msg


def test_hest_unreachable_hub_gives_one_sentence(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    with pytest.raises(DownloadError) as ei:
        download_hest(["TENX95"], tmp_path / "hest", endpoint=f"http://127.0.0.1:{port}")
    msg = str(ei.value)
    assert _one_sentence(msg), msg
    assert "cannot be reached" in msg and "--mirror" in msg


def test_hest_complete_folder_needs_no_network(tmp_path, monkeypatch):
    _forbid_hub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hest"
    _make_mirror(out, ["HEST_v1_1_0.csv", *HEST_FILES_OF["TENX95"]])
    assert download_hest(["TENX95"], out) == out


def test_hest_hub_call_uses_patterns_and_no_token_argument(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    class _Info:
        sha = "a" * 40

    def fake_repo_info(self, **kw):
        calls.append(("repo_info", kw))
        return _Info()

    def fake_snapshot(**kw):
        calls.append(("snapshot", kw))
        _make_mirror(Path(kw["local_dir"]), list(filter_repo_objects(_fake_hest_tree(),
                                                                     allow_patterns=kw["allow_patterns"])))
        return str(kw["local_dir"])

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", fake_repo_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = tmp_path / "hest"
    download_hest(["TENX95"], out, revision="v1.1")
    assert [c[0] for c in calls] == ["repo_info", "snapshot"]
    assert calls[0][1]["repo_type"] == "dataset" and calls[0][1]["revision"] == "v1.1"
    kw = calls[1][1]
    assert kw["repo_id"] == "MahmoodLab/hest" and kw["repo_type"] == "dataset"
    assert kw["revision"] == "a" * 40 and Path(kw["local_dir"]) == out
    assert "token" not in kw
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert got == {"HEST_v1_1_0.csv", *HEST_FILES_OF["TENX95"]}
    download_hest(["TENX95"], out)  # complete: no second Hub call
    assert len(calls) == 2
    # a sample the dataset lacks is reported, not silently skipped
    with pytest.raises(DownloadError, match="NOSUCH1"):
        download_hest(["NOSUCH1"], out)


def test_fake_token_never_leaks(tmp_path, monkeypatch, capsys, caplog):
    from stlib.cli import main

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub, t = _serve(_GatedHubHandler)
    endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
    try:
        caplog.set_level(logging.DEBUG)
        with pytest.raises(DownloadError) as ei:
            download_hest(["TENX95"], tmp_path / "hest", endpoint=endpoint)
        rc = main(["download", "hest", "--ids", "TENX95", "--out", str(tmp_path / "hest"),
                   "--endpoint", endpoint])
    finally:
        hub.shutdown()
        hub.server_close()
        t.join(5)
    # the token was really sent (from the environment), and echoed back by the server ...
    assert any(FAKE_TOKEN in auth for _, auth in hub.seen), hub.seen
    # ... yet it appears nowhere we produce
    msg = str(ei.value)
    assert "accept the HEST-1k terms" in msg and "HF_TOKEN" in msg
    assert FAKE_TOKEN not in msg
    assert ei.value.__cause__ is None or FAKE_TOKEN not in str(ei.value.__cause__)
    assert rc == 1
    out, err = capsys.readouterr()
    assert "accept the HEST-1k terms" in err
    assert FAKE_TOKEN not in out and FAKE_TOKEN not in err
    assert FAKE_TOKEN not in caplog.text


def test_token_is_scrubbed_from_messages(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    saved = "hf_SAVEDlogin987654321"
    (tmp_path / "token").write_text(saved + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    err = DownloadError(f"server said: {FAKE_TOKEN}, {saved} and Authorization: Bearer xyz123")
    assert FAKE_TOKEN not in str(err) and saved not in str(err) and "xyz123" not in str(err)


# --------------------------------------------------------------------------------------------
# PanNuke
# --------------------------------------------------------------------------------------------

def _pannuke_zip(k: int) -> bytes:
    buf = io.BytesIO()
    arrays = {f"Fold {k}/images/fold{k}/images.npy": np.full((2, 4, 4, 3), k, np.uint8),
              f"Fold {k}/images/fold{k}/types.npy": np.array(["Breast", "Colon"]),
              f"Fold {k}/masks/fold{k}/masks.npy": np.zeros((2, 4, 4, 6), np.float64)}
    with zipfile.ZipFile(buf, "w") as zf:
        for name, arr in arrays.items():
            b = io.BytesIO()
            np.save(b, arr)
            zf.writestr(name, b.getvalue())
    return buf.getvalue()


def test_download_pannuke_layout_and_idempotence(server, tmp_path):
    folds = {}
    for k in (1, 2):
        data = _pannuke_zip(k)
        (server.root / f"fold_{k}.zip").write_bytes(data)
        folds[k] = {"url": f"{server.url}/fold_{k}.zip", "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"pannuke": {"folds": folds}}
    out = tmp_path / "pannuke"
    download_pannuke(out, folds=(1, 2), manifest=manifest)
    for k in (1, 2):
        imgs = np.load(out / f"Fold {k}" / "images" / f"fold{k}" / "images.npy")
        assert imgs.shape == (2, 4, 4, 3) and int(imgs[0, 0, 0, 0]) == k
        assert (out / f"Fold {k}" / "masks" / f"fold{k}" / "masks.npy").is_file()
    assert not list(out.glob(".archives/*.zip")) and not list(out.glob(".*.tmp"))
    n = len(server.seen)
    download_pannuke(out, folds=(1, 2), manifest=manifest)
    assert len(server.seen) == n


def test_download_pannuke_rejects_wrong_archive(server, tmp_path):
    data = _pannuke_zip(2)  # fold 2's content behind fold 1's URL
    (server.root / "fold_1.zip").write_bytes(data)
    with pytest.raises(DownloadError, match="images/fold1/images.npy"):
        download_pannuke(tmp_path / "pn", folds=[1], manifest={"pannuke": {1: f"{server.url}/fold_1.zip"}})
    assert not (tmp_path / "pn" / "Fold 1").exists()
    assert not (tmp_path / "pn" / ".archives" / "fold_1.zip").exists()  # next run fetches anew


def test_pannuke_sources_fall_back_to_defaults(monkeypatch):
    monkeypatch.setitem(sys.modules, "stlib.io.manifest", None)  # import fails -> built-in URLs
    src = pannuke_sources((1, 3))
    assert src[1]["url"].endswith("/pannuke/fold_1.zip") and src[3]["sha256"] is None
    assert set(src) == {1, 3}
    src = pannuke_sources([2], manifest={"pannuke": [{"fold": 2, "url": "http://x/f2.zip", "sha256": "ab" * 32}]})
    assert src[2] == {"url": "http://x/f2.zip", "sha256": "ab" * 32, "size": None}
    with pytest.raises(InputError, match="folds 1, 2 and 3"):
        pannuke_sources([4])


def test_pannuke_sources_from_the_repository_manifest(repo):
    from stlib.io import manifest as manifest_mod

    m = manifest_mod.load_manifest(repo / "data_manifest.yaml")
    folds = {int(f["fold"]): f for f in m.pannuke.get("folds", [])}
    assert folds, "data_manifest.yaml has no pannuke.folds"
    src = pannuke_sources(sorted(folds), manifest=m)
    for k, entry in folds.items():
        assert src[k]["url"] == entry["url"] and src[k]["sha256"] == entry.get("sha256")
