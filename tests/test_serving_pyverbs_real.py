"""The pyverbs stand-in (tests/test_serving_verbs_sim.py) checked against the real pyverbs.

No RDMA device exists here, but rdma-core's ``python3-pyverbs`` (Debian's, for
``/usr/bin/python3``) imports and describes itself. The check has two halves:

1. *What is used*: the verbs provider runs its whole path (set-up by LID and by GID, SEND/RECV,
   one-sided READ, a failing READ, a ranker batch) on the stand-in with every stand-in class and
   function wrapped to record each call and attribute access coming from evssd's code: which
   constructor or method, how many positional arguments, which keywords, which attributes.
2. *The real thing*: a script under ``/usr/bin/python3`` checks each record against pyverbs:
   the module attribute exists; constants have the stand-in's values; constructors accept the
   call (Cython parses arguments before running the body, so a call with placeholder values
   fails on a missing device or a wrong type, never on arity or a keyword, unless the shape is
   wrong); methods' arity comes from Cython's own argument errors on an uninitialised instance
   (too many and too few arguments, so the body never runs) and keyword names from the
   ``:param name:`` lines of their docstrings; attributes exist on the real classes.

Every class, method and constant the stand-in defines must exist in pyverbs too, so the
stand-in cannot grow an invention the provider might come to rely on.
"""
import inspect
import json
import os
import subprocess
import sys
import threading
import types

import numpy as np

from evssd.host.serving import protocol as P
from evssd.host.serving.config import make_config
from evssd.host.serving.engine import Engine
from evssd.host.serving.providers import get_provider
from evssd.host.serving.ranker import Ranker, local_pooled, synthetic_batch

from .test_serving_verbs_sim import _fake_pyverbs

SYSTEM_PYTHON = "/usr/bin/python3"
_OURS = os.sep + os.path.join("host", "serving") + os.sep

_PROBE = r'''
import importlib, json, re, sys
spec = json.load(sys.stdin)
problems, checked = [], 0
ARITY = re.compile(r"takes (exactly|at most|at least) (\w+) (?:positional )?arguments?|takes no arguments|"
                   r"takes exactly one argument")
WORDS = {"one": 1, "zero": 0}
def num(w): return WORDS.get(w, None) if not w.isdigit() else int(w)
def mod(name): return importlib.import_module("pyverbs." + name)
def arity(fn):
    """(min, max) positional arguments of a Cython method, from its argument errors."""
    lo, hi = 0, None
    # both probes fail while parsing arguments, so the body never runs on the bare instance
    # (a call that parsed would: an empty call runs e.g. CQ.poll(num_entries=1) on no CQ)
    for args, kw in (((None,) * 20, {}), ((), {"evssd_no_such_keyword": 1})):
        try:
            fn(*args, **kw)
            continue
        except TypeError as exc:
            msg = str(exc)
        except Exception:
            continue                    # parsed fine and failed in the body: no bound learnt
        if "takes no arguments" in msg:
            return 0, 0
        if "takes exactly one argument" in msg:
            return 1, 1
        m = ARITY.search(msg)
        if m is None:
            continue
        kind, n = m.group(1), num(m.group(2))
        if kind == "exactly":
            return n, n
        if kind == "at most":
            hi = n
        if kind == "at least":
            lo = n
    return lo, hi
def doc_params(fn):
    return set(re.findall(r":param\s+(\w+):", getattr(fn, "__doc__", "") or ""))
for c in spec["consts"]:
    checked += 1
    m = mod(c["module"])
    if not hasattr(m, c["name"]):
        problems.append(f"constant pyverbs.{c['module']}.{c['name']} does not exist")
    elif int(getattr(m, c["name"])) != c["value"]:
        problems.append(f"constant pyverbs.{c['module']}.{c['name']} = {int(getattr(m, c['name']))}, "
                        f"the stand-in says {c['value']}")
for a in spec["names"]:
    checked += 1
    m = mod(a["module"])
    obj = getattr(m, a["cls"], None)
    if obj is None:
        problems.append(f"pyverbs.{a['module']}.{a['cls']} does not exist")
    elif a.get("attr") and not hasattr(obj, a["attr"]):
        problems.append(f"pyverbs.{a['module']}.{a['cls']} has no attribute {a['attr']!r}")
BAD_SHAPE = re.compile(r"unexpected keyword argument|takes (exactly|at most|at least|no) .*argument|"
                       r"positional argument|takes exactly one argument")
for c in spec["calls"]:
    checked += 1
    m = mod(c["module"])
    where = f"pyverbs.{c['module']}.{c['cls']}" + (f".{c['method']}" if c["method"] else "")
    cls = getattr(m, c["cls"], None)
    if cls is None:
        problems.append(f"{where}: does not exist")
        continue
    n, kws = c["nargs"], c["kw"]
    if c["method"] is None:                       # constructor or module function
        try:
            cls(*([None] * n), **{k: None for k in kws})
        except Exception as exc:
            if isinstance(exc, TypeError) and BAD_SHAPE.search(str(exc)):
                problems.append(f"{where}({n} positional, keywords {kws}): {exc}")
        continue
    fn = getattr(cls, c["method"], None)
    if fn is None:
        problems.append(f"{where}: no such method")
        continue
    try:
        inst = cls.__new__(cls)
    except Exception as exc:
        problems.append(f"{where}: cannot make a bare instance to read its arity ({exc})")
        continue
    lo, hi = arity(getattr(inst, c["method"]))
    if hi is None:
        problems.append(f"{where}: arity unknown (no argument error to read)")
        continue
    if not (lo <= n + len(kws) and n <= hi):
        problems.append(f"{where}: called with {n} positional + {len(kws)} keyword, real takes {lo}..{hi}")
    unknown = set(kws) - doc_params(fn)
    if unknown:
        problems.append(f"{where}: keywords {sorted(unknown)} not among its parameters {sorted(doc_params(fn))}")
print(json.dumps({"checked": checked, "problems": problems}))
'''


def _system_pyverbs():
    """Fail loudly (never skip) when the real pyverbs is missing: `make test` installs it."""
    hint = ("the real pyverbs is needed: `apt-get update && apt-get install -y python3-pyverbs` "
            "(Debian's rdma-core, for /usr/bin/python3; `make test` does this)")
    assert os.path.exists(SYSTEM_PYTHON), f"{SYSTEM_PYTHON} not found; {hint}"
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import pyverbs.device, pyverbs.qp, pyverbs.wr, pyverbs.enums"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"import pyverbs failed under {SYSTEM_PYTHON}: {r.stderr.strip()[-500:]}; {hint}"


# ------------------------------------------------------------------ recording the stand-in
class _Recorder:
    def __init__(self, mods):
        self.calls, self.attrs, self.consts = set(), set(), {}
        self.origin = {}                   # stand-in class -> (module, real class name)
        for modname, m in mods.items():
            if modname == "pyverbs":
                continue
            short = modname.split(".", 1)[1]
            for name, obj in list(vars(m).items()):
                if name.startswith("_"):
                    continue
                if isinstance(obj, type):
                    self.origin[obj] = (short, name)
                    self._wrap_class(short, name, obj)
                elif callable(obj):
                    setattr(m, name, self._wrap_fn(short, name, None, obj))
                elif isinstance(obj, int):
                    self.consts[(short, name)] = int(obj)

    @staticmethod
    def _from_us():
        f = sys._getframe(2)
        return _OURS in f.f_code.co_filename

    def _wrap_fn(self, module, cls, method, fn):
        rec = self

        def wrapper(*args, **kw):
            if rec._from_us():
                skip = 0 if method is None else 1      # `self`
                rec.calls.add((module, cls, method, len(args) - skip, tuple(sorted(kw))))
            return fn(*args, **kw)
        return wrapper

    def _wrap_class(self, module, name, cls):
        rec = self
        for attr, val in list(vars(cls).items()):
            if attr == "__init__":
                init = val

                def new_init(self, *args, _init=init, **kw):
                    if rec._from_us():
                        rec.calls.add((module, name, None, len(args), tuple(sorted(kw))))
                    _init(self, *args, **kw)
                cls.__init__ = new_init
            elif not attr.startswith("_") and inspect.isfunction(val):
                setattr(cls, attr, self._wrap_fn(module, name, attr, val))

        def getattribute(self, attr, _name=name):
            if not attr.startswith("_") and rec._from_us():
                rec.attrs.add((module, _name, attr))
            return object.__getattribute__(self, attr)

        def setattr_(self, attr, value, _name=name):
            if not attr.startswith("_") and rec._from_us():
                rec.attrs.add((module, _name, attr))
            object.__setattr__(self, attr, value)
        cls.__getattribute__ = getattribute
        cls.__setattr__ = setattr_


def _workload(monkeypatch, lid):
    mods = _fake_pyverbs()
    rec = _Recorder(mods)
    if lid == 0:                                   # RoCE: route by GID
        PortAttr = mods["pyverbs.device"].PortAttr
        monkeypatch.setattr(mods["pyverbs.device"].Context, "query_port", lambda self, port: PortAttr(0))
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    from evssd.host.serving.server import EmbeddingServer
    cfg = make_config(1, 600, 4, 1)
    srv = EmbeddingServer(cfg, "s0", provider="verbs", host="127.0.0.1", port=0, credits=8)
    cfg["servers"]["s0"]["port"] = srv.address[1]
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        for fetch in ("pooled", "rows"):
            with Engine(get_provider("verbs"), 1, credits=8, request_timeout=10) as eng:
                r = Ranker(cfg, eng, fetch=fetch, timeout=10)
                _, sparse = synthetic_batch(cfg, 8, 3, np.random.default_rng(lid))
                for g, w in zip(r.embeddings(sparse), local_pooled(cfg, sparse)):
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
                if fetch == "rows":              # a READ outside the region: an error completion
                    m = r.meta["s0"]["t0"]
                    fut = eng.read(r.conns["s0"], m["rkey"], m["addr"] + 600 * 16, 16)
                    try:
                        fut.result(10)
                        raise AssertionError("READ outside the region succeeded")
                    except P.RemoteError:
                        pass
    finally:
        srv.close()
        th.join(5)
    return rec


def test_stand_in_and_provider_match_the_real_pyverbs(monkeypatch):
    _system_pyverbs()
    recs = [_workload(monkeypatch, lid) for lid in (1, 0)]
    calls = set().union(*(r.calls for r in recs))
    attrs = set().union(*(r.attrs for r in recs))
    rec = recs[0]
    # the recording saw the whole path: set-up, both routes, SEND/RECV, READ, completions
    used = {(m, c, meth) for m, c, meth, _, _ in calls}
    for must in [("device", "get_device_list", None), ("device", "Context", "query_gid"),
                 ("qp", "QP", "to_rtr"), ("qp", "QP", "post_send"), ("qp", "QP", "post_recv"),
                 ("wr", "SendWR", "set_wr_rdma"), ("cq", "CQ", "poll"), ("mr", "MR", "read"),
                 ("addr", "GlobalRoute", None), ("addr", "GID", None), ("addr", "AHAttr", None)]:
        assert must in used, f"the provider never called {must} on the stand-in"
    assert ("cq", "WC", "status") in attrs and ("qp", "QPAttr", "dest_qp_num") in attrs
    spec = {"consts": [], "names": [], "calls": []}
    # the stand-in's own surface: constants with values, classes, public methods
    for (m, name), value in rec.consts.items():
        spec["consts"].append({"module": m, "name": name, "value": value})
    for cls, (m, name) in rec.origin.items():
        spec["names"].append({"module": m, "cls": name})
        for attr, val in vars(cls).items():
            if not attr.startswith("_") and callable(val):
                spec["names"].append({"module": m, "cls": name, "attr": attr})
    # what evssd's code used: calls with their shape, attributes read or written
    for m, c, meth, n, kw in sorted(calls, key=str):
        spec["calls"].append({"module": m, "cls": c, "method": meth, "nargs": n, "kw": list(kw)})
    for m, c, a in sorted(attrs):
        spec["names"].append({"module": m, "cls": c, "attr": a})
    r = subprocess.run([SYSTEM_PYTHON, "-c", _PROBE], input=json.dumps(spec), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["checked"] == len(spec["consts"]) + len(spec["names"]) + len(spec["calls"]) and out["checked"] > 60
    assert not out["problems"], "the stand-in or the provider drifted from pyverbs:\n" + "\n".join(out["problems"])


def test_probe_detects_a_wrong_shape():
    """The checker itself: invented names, wrong constants, wrong arity or keywords are caught."""
    _system_pyverbs()
    spec = {"consts": [{"module": "enums", "name": "IBV_WR_SEND", "value": 99}],
            "names": [{"module": "qp", "cls": "QP", "attr": "post_anything"}, {"module": "wr", "cls": "NoSuchWR"}],
            "calls": [{"module": "wr", "cls": "SendWR", "method": "set_wr_rdma", "nargs": 3, "kw": []},
                      {"module": "wr", "cls": "SGE", "method": None, "nargs": 0, "kw": ["address"]},
                      {"module": "mr", "cls": "MR", "method": "write", "nargs": 1, "kw": ["size"]},
                      {"module": "wr", "cls": "SendWR", "method": "set_wr_rdma", "nargs": 2, "kw": []}]}
    r = subprocess.run([SYSTEM_PYTHON, "-c", _PROBE], input=json.dumps(spec), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    problems = json.loads(r.stdout)["problems"]
    assert len(problems) == 6, problems      # everything but the last, correct, call
    joined = "\n".join(problems)
    for needle in ("IBV_WR_SEND = 2, the stand-in says 99", "no attribute 'post_anything'", "NoSuchWR does not exist",
                   "set_wr_rdma: called with 3 positional", "SGE(0 positional, keywords ['address'])",
                   "keywords ['size'] not among"):
        assert needle in joined, joined
