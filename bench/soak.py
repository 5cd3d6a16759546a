"""Soak: several tenants upload, fetch and delete contexts against one streamer (disk+redis tiers) while
the server is killed with SIGKILL and restarted at random moments; at the end every acknowledged,
undeleted context must be served completely and byte-exact, every deleted one must be absent, and
nothing else may be served.

    python bench/soak.py --quick                      # <= 2 min (CI runs it: tests/test_soak.py)
    nice python bench/soak.py --seconds 1800 --json bench/results/soak.json   # long mode

What runs: a private ``redis-server`` (AOF, ``appendfsync always``) and the streamer in its own
process (``serve_in_background(mode="process")``, tiny random model, chunks of 32 tokens, store
``disk+redis``, fsync on), restarted on the same port, folder and Redis after every kill. Each tenant
has a pool of shared prefixes; each worker thread owns its contexts (prefix + its own tail), so
contexts of one tenant share chunks across workers (a delete by one worker races uploads by another
that reuse the same chunks) while each context's expected state is known exactly:

* ``present``: acknowledged (201) and not deleted since -> the recorded manifest, every chunk at every
  level, bytes matching the manifest's checksums;
* ``deleted``: acknowledged (204) -> 404 for the manifest and the chunks;
* an upload or delete whose connection died (the kill) -> either state, but never partial: absent, or
  served completely and consistently (a re-upload of a present context may not make it absent).

During the run every fetched chunk is checked against its manifest's checksum; a present context
answering 404, a deleted one answering 200, wrong bytes or any 5xx other than a 503 count as
failures. At the end the server is killed once more and restarted, every context is checked, and
the context records in the store are listed: each one must be a context the workers expect.
Prints a table and writes the counts as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ctxstream.hostinfo import host_info
from ctxstream.manifest import checksum_hex, chunk_ids, id_key
from ctxstream.streamer.server import serve_in_background
from ctxstream.streamer.settings import Settings
from ctxstream.streamer.storage.localcluster import free_ports

CT = 32
SECRET = "soak-id-secret-0123456789"
TENANTS = ["acme", "umbrella", "initech", "globex"]


def free_port() -> int:
    """A loopback port for a server this run starts (and may restart on the same port)."""
    return free_ports(1)[0]


class Redis:
    def __init__(self, folder: Path):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise SystemExit("redis-server not found (apt-get install -y redis-server)")
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(folder), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.05)
        self.client = client

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Ctx:
    tenant: str
    tokens: list[int]
    id: str
    state: str = "new"  # new | present | deleted | maybe (an upload or delete whose answer was lost)
    manifest: dict | None = None
    must_exist: bool = False  # for "maybe": it was present before (a lost re-upload must not remove it)


@dataclass
class Stats:
    c: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def inc(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.c[key] += n

    def fail(self, what: str) -> None:
        with self.lock:
            self.c["failures"] += 1
            if len(self.failures) < 50:
                self.failures.append(what)


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="ctxstream-soak-"))
        (self.tmp / "redis").mkdir()
        self.redis = Redis(self.tmp / "redis")
        self.port = free_port()
        self.tokens = {f"tok-{t}-soak-0001": t for t in TENANTS[: args.tenants]}
        self.auth = {t: {"Authorization": f"Bearer {tok}"} for tok, t in self.tokens.items()}
        self.settings = Settings(model="tiny-random", store="disk+redis", data_dir=self.tmp / "data",
                                 redis_url=self.redis.url, tokens=self.tokens, chunk_tokens=CT, fsync=True,
                                 log_level="error", id_secret=SECRET, max_concurrent_uploads=2,
                                 max_uploads_per_tenant=2)
        self.key = id_key(SECRET)
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats = Stats()
        self.srv = None
        self.up = threading.Event()
        self.stop = threading.Event()
        self.restart_s: list[float] = []
        self.fingerprint = None

    # ------------------------------------------------------------------ server
    def start_server(self) -> None:
        t0 = time.monotonic()
        for attempt in range(20):
            try:
                self.srv = serve_in_background(self.settings, mode="process", port=self.port)
                break
            except RuntimeError:  # the port still held by the dying process: try again
                time.sleep(0.5)
        else:
            raise SystemExit("the streamer did not restart")
        self.restart_s.append(time.monotonic() - t0)
        if self.fingerprint is None:
            self.fingerprint = httpx.get(self.url + "/v1/info").json()["fingerprint"]
        self.up.set()

    def kill_server(self) -> None:
        self.up.clear()
        os.kill(self.srv.pid, signal.SIGKILL)
        self.srv._proc.wait(10)
        self.srv._stopped = True
        self.stats.inc("kills")

    def killer(self) -> None:
        lo, hi = self.args.kill_every
        while not self.stop.wait(self.rng.uniform(lo, hi)):
            self.kill_server()
            time.sleep(self.rng.uniform(0, 0.5))
            self.start_server()

    # ------------------------------------------------------------------ workload
    def worker(self, tenant: str, wid: int, prefixes: list[list[int]], ctxs: list[Ctx]) -> None:
        rng = random.Random(self.args.seed * 1000 + wid)
        client = httpx.Client(headers=self.auth[tenant], timeout=60)
        while not self.stop.is_set():
            if not self.up.wait(1):
                continue
            try:
                r = rng.random()
                present = [c for c in ctxs if c.state == "present"]
                if r < 0.3 or not ctxs:
                    if present and rng.random() < 0.2:
                        self.upload(client, rng.choice(present))  # a re-upload: every chunk reused
                    else:
                        tail = [rng.randrange(3, 500) for _ in range(rng.randrange(1, 3 * CT))]
                        toks = rng.choice(prefixes) + tail
                        c = Ctx(tenant, toks, chunk_ids(self.key, self.fingerprint, tenant, toks, CT)[-1])
                        ctxs.append(c)
                        self.upload(client, c)
                elif r < 0.88 or len(present) < 2:
                    live = [c for c in ctxs if c.state != "deleted"]
                    self.fetch(client, rng.choice(live if live and rng.random() < 0.9 else ctxs), rng)
                else:
                    self.delete(client, rng.choice(present))
            except httpx.TransportError:
                self.stats.inc("transport_errors")
                time.sleep(0.05)
        client.close()

    def _status(self, r: httpx.Response, what: str) -> None:
        if r.status_code >= 500 and r.status_code != 503:
            self.stats.fail(f"{what}: {r.status_code} {r.text[:200]}")

    def upload(self, client: httpx.Client, c: Ctx) -> None:
        before = c.state
        c.state, c.must_exist = "maybe", before == "present" or (before == "maybe" and c.must_exist)
        try:
            r = client.post(self.url + "/v1/contexts", json={"token_ids": c.tokens})
        except httpx.TransportError:
            self.stats.inc("uploads_interrupted")
            raise
        self._status(r, "upload")
        if r.status_code == 201:
            body = r.json()
            if body["id"] != c.id:
                self.stats.fail(f"upload answered id {body['id']}, expected {c.id}")
            c.state, c.manifest, c.must_exist = "present", body["manifest"], False
            self.stats.inc("uploads")
            self.stats.inc("chunks_reused", body["reused_chunks"])
        else:  # refused: nothing changed
            c.state = before
            self.stats.inc(f"uploads_refused_{r.status_code}")
            if r.status_code in (429, 503):
                time.sleep(float(r.headers.get("retry-after", "1")) * random.uniform(0.2, 0.6))

    def delete(self, client: httpx.Client, c: Ctx) -> None:
        c.state, c.must_exist = "maybe", False
        try:
            r = client.delete(f"{self.url}/v1/contexts/{c.id}")
        except httpx.TransportError:
            self.stats.inc("deletes_interrupted")
            raise
        self._status(r, "delete")
        if r.status_code == 204:
            c.state = "deleted"
            self.stats.inc("deletes")
        elif r.status_code == 404:
            self.stats.fail(f"delete of present context {c.id}: 404")
            c.state = "deleted"
        else:
            c.state = "present"
            self.stats.inc(f"deletes_refused_{r.status_code}")

    def fetch(self, client: httpx.Client, c: Ctx, rng: random.Random) -> None:
        if c.state == "new":
            return
        r = client.get(f"{self.url}/v1/contexts/{c.id}")
        self.stats.inc("manifest_fetches")
        self._status(r, "manifest")
        if r.status_code == 503:
            return
        if c.state == "present":
            if r.status_code != 200 or r.json() != c.manifest:
                self.stats.fail(f"present context {c.id}: manifest {r.status_code}")
                return
        elif c.state == "deleted":
            if r.status_code != 404:
                self.stats.fail(f"deleted context {c.id} answered {r.status_code}")
            return
        if r.status_code != 200:
            return
        m = r.json()
        for chunk in m["chunks"]:
            lv = rng.choice(m["levels"])
            g = client.get(f"{self.url}/v1/contexts/{c.id}/chunks/{chunk['index']}", params={"level": lv})
            self.stats.inc("chunk_fetches")
            self._status(g, "chunk")
            if g.status_code == 200:
                self.stats.inc("bytes_fetched", len(g.content))
                if len(g.content) != chunk["sizes"][lv] or checksum_hex(g.content) != chunk["checksums"][lv]:
                    self.stats.fail(f"context {c.id} chunk {chunk['index']} {lv}: wrong bytes")
            elif c.state == "present" and g.status_code != 503:
                self.stats.fail(f"present context {c.id} chunk {chunk['index']} {lv}: {g.status_code}")

    # ------------------------------------------------------------------ final check
    def served_completely(self, client: httpx.Client, c: Ctx, manifest: dict | None) -> str:
        """"absent", "complete" or a reason it is partial/wrong."""
        r = client.get(f"{self.url}/v1/contexts/{c.id}")
        if r.status_code == 404:
            for idx in (0,):
                g = client.get(f"{self.url}/v1/contexts/{c.id}/chunks/{idx}", params={"level": "fp16"})
                if g.status_code != 404:
                    return f"manifest 404 but chunk {idx} {g.status_code}"
            return "absent"
        if r.status_code != 200:
            return f"manifest {r.status_code}"
        m = r.json()
        if manifest is not None and m != manifest:
            return "manifest differs from the acknowledged one"
        if [t for ch in m["chunks"] for t in ch["token_ids"]] != c.tokens:
            return "manifest has other tokens"
        for ch in m["chunks"]:
            for lv in m["levels"]:
                g = client.get(f"{self.url}/v1/contexts/{c.id}/chunks/{ch['index']}", params={"level": lv})
                self.stats.inc("final_chunk_fetches")
                if g.status_code != 200:
                    return f"chunk {ch['index']} {lv}: {g.status_code}"
                if len(g.content) != ch["sizes"][lv] or checksum_hex(g.content) != ch["checksums"][lv]:
                    return f"chunk {ch['index']} {lv}: wrong bytes"
        return "complete"

    def final_check(self, all_ctxs: list[Ctx]) -> None:
        clients = {t: httpx.Client(headers=self.auth[t], timeout=60) for t in self.auth}
        expected_ids = set()
        for c in all_ctxs:
            if c.state == "new":
                continue
            got = self.served_completely(clients[c.tenant], c, c.manifest if c.state == "present" else None)
            self.stats.inc(f"checked_{c.state}")
            ok = {"present": got == "complete", "deleted": got == "absent",
                  "maybe": got == "complete" or (got == "absent" and not c.must_exist)}[c.state]
            if not ok:
                self.stats.inc("losses")
                self.stats.fail(f"final: {c.state} context {c.id} (must_exist={c.must_exist}): {got}")
            if got == "complete":
                expected_ids.add(c.id)
                self.stats.inc("final_contexts_served")
                other = next(t for t in self.auth if t != c.tenant)
                if clients[other].get(f"{self.url}/v1/contexts/{c.id}").status_code != 404:
                    self.stats.fail(f"final: context {c.id} visible to tenant {other}")
        for cl in clients.values():
            cl.close()
        # nothing else is served: every context record in the store is one of the expected contexts
        prefix = self.settings.redis_prefix
        in_redis = {k.decode()[len(prefix) + 4:] for k in self.redis.client.scan_iter(match=prefix + "ctx.*")}
        on_disk = {p.name[4:] for p in (self.tmp / "data" / "objects").rglob("ctx.*")}
        unexpected = (in_redis | on_disk) - expected_ids
        self.stats.c["final_context_records"] = len(in_redis | on_disk)
        self.stats.c["unexpected_contexts"] = len(unexpected)
        if unexpected:
            self.stats.inc("losses", 0)
            self.stats.fail(f"final: {len(unexpected)} context records nobody expects: {sorted(unexpected)[:3]}")
        self.stats.c["tombstones_left"] = len(list(self.redis.client.scan_iter(match=prefix + "tomb.*")))
        self.stats.c["chunk_objects_left"] = len(list(self.redis.client.scan_iter(match=prefix + "chunk.*")))

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        args = self.args
        t_start = time.monotonic()
        self.start_server()
        tenants = list(self.auth)
        prefix_rng = random.Random(args.seed)
        prefixes = {t: [[prefix_rng.randrange(3, 500) for _ in range(CT * prefix_rng.randrange(1, 4))]
                        for _ in range(3)] for t in tenants}
        ctxs: dict[tuple[str, int], list[Ctx]] = {}
        threads = []
        for t in tenants:
            for w in range(args.workers):
                wid = len(ctxs)
                ctxs[(t, wid)] = []
                threads.append(threading.Thread(target=self.worker, args=(t, wid, prefixes[t], ctxs[(t, wid)]),
                                                daemon=True))
        killer = threading.Thread(target=self.killer, daemon=True)
        for th in threads:
            th.start()
        killer.start()
        self.stop.wait(args.seconds)
        self.stop.set()
        killer.join(120)
        for th in threads:
            th.join(120)
        workload_s = time.monotonic() - t_start
        # one more kill and restart: the end state is what a restart recovers
        self.kill_server()
        self.start_server()
        all_ctxs = [c for v in ctxs.values() for c in v]
        t_check = time.monotonic()
        self.final_check(all_ctxs)
        self.srv.stop()
        self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
        c = self.stats.c
        return {
            "mode": "quick" if args.quick else "long", "seconds": args.seconds, "workload_s": round(workload_s, 1),
            "check_s": round(time.monotonic() - t_check, 1), "tenants": len(tenants), "workers_per_tenant": args.workers,
            "kill_every_s": list(args.kill_every), "seed": args.seed, "store": self.settings.store,
            "chunk_tokens": CT, "kills": c["kills"], "restart_s_mean": round(sum(self.restart_s) / len(self.restart_s), 2),
            "restart_s_max": round(max(self.restart_s), 2),
            "uploads": c["uploads"], "uploads_interrupted": c["uploads_interrupted"],
            "uploads_refused": {k.rsplit("_", 1)[1]: v for k, v in c.items() if k.startswith("uploads_refused_")},
            "chunks_reused": c["chunks_reused"], "deletes": c["deletes"], "deletes_interrupted": c["deletes_interrupted"],
            "manifest_fetches": c["manifest_fetches"], "chunk_fetches": c["chunk_fetches"],
            "bytes_fetched": c["bytes_fetched"], "transport_errors": c["transport_errors"],
            "contexts_checked": sum(v for k, v in c.items() if k.startswith("checked_")),
            "checked_present": c["checked_present"], "checked_deleted": c["checked_deleted"],
            "checked_uncertain": c["checked_maybe"], "final_contexts_served": c["final_contexts_served"],
            "final_chunk_fetches": c["final_chunk_fetches"], "final_context_records": c["final_context_records"],
            "unexpected_contexts": c["unexpected_contexts"], "tombstones_left": c["tombstones_left"],
            "chunk_objects_left": c["chunk_objects_left"],
            "losses": c["losses"], "failures": c["failures"], "failure_examples": self.stats.failures,
            "host": host_info(), "shared_machine": True, "commit": args.commit or _commit(),
        }


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="<= 2 min: 60 s of load, a kill every 10-18 s")
    p.add_argument("--seconds", type=float, default=None, help="workload duration (default 1800; 60 with --quick)")
    p.add_argument("--kill-every", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="seconds between kills, uniform (default 60 150; 10 18 with --quick)")
    p.add_argument("--tenants", type=int, default=None, help="tenants (default 3; 2 with --quick)")
    p.add_argument("--workers", type=int, default=2, help="worker threads per tenant")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--json", type=Path, default=None, help="write the counts here")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse of this checkout)")
    args = p.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (60.0 if args.quick else 1800.0)
    args.kill_every = tuple(args.kill_every or ((10.0, 18.0) if args.quick else (60.0, 150.0)))
    args.tenants = min(len(TENANTS), args.tenants or (2 if args.quick else 3))
    out = Soak(args).run()
    rows = [("mode", out["mode"]), ("workload s", out["workload_s"]), ("kills", out["kills"]),
            ("restart s (mean/max)", f"{out['restart_s_mean']}/{out['restart_s_max']}"),
            ("uploads acknowledged", out["uploads"]), ("uploads interrupted", out["uploads_interrupted"]),
            ("uploads refused", out["uploads_refused"]), ("deletes acknowledged", out["deletes"]),
            ("deletes interrupted", out["deletes_interrupted"]), ("manifest fetches", out["manifest_fetches"]),
            ("chunk fetches", out["chunk_fetches"]), ("contexts checked", out["contexts_checked"]),
            ("  present / deleted / uncertain", f"{out['checked_present']} / {out['checked_deleted']} / "
                                                f"{out['checked_uncertain']}"),
            ("context records in the store", out["final_context_records"]),
            ("unexpected contexts", out["unexpected_contexts"]), ("losses", out["losses"]),
            ("failures (all kinds)", out["failures"])]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    for f in out["failure_examples"][:10]:
        print("  FAIL:", f)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["failures"] == 0 and out["losses"] == 0 and out["unexpected_contexts"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
