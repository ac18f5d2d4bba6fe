"""L0: the register map is consistent, its doc is current, descriptors round-trip."""
import random
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from evssd.hw import regmap
from evssd.hw.regmap import Access, Command, Completion, Params
from evssd.host import regmap_doc


def test_addresses_unique_and_aligned():
    seen = {}
    for addr, reg, ch in regmap.all_addresses(regmap.MAX_CHANNELS):
        assert addr % 4 == 0, reg.name
        assert addr < 0x1000, reg.name
        assert addr not in seen, f"{reg.name} and {seen.get(addr)} share 0x{addr:03x}"
        seen[addr] = reg.name


def test_fields_fit_and_do_not_overlap():
    for reg in regmap.REGISTERS:
        used = 0
        for f in reg.fields:
            assert 0 <= f.lsb and f.lsb + f.width <= 32, (reg.name, f.name)
            assert not (used & f.mask), f"{reg.name}.{f.name} overlaps another field"
            used |= f.mask
            assert 0 <= f.reset < (1 << f.width), (reg.name, f.name)


def test_id_block_is_read_only_and_names_params():
    for reg in regmap.REGISTERS:
        if reg.addr < 0x040:
            assert all(f.access is Access.RO for f in reg.fields), reg.name
            if reg.param:
                assert hasattr(Params(), reg.param), reg.param


def test_docs_registers_md_is_current():
    current = regmap_doc.DOC_PATH.read_text()
    assert current == regmap_doc.render_markdown(), "docs/registers.md is stale: run `evssd regmap --write`"


def test_regmap_check_command_detects_staleness(tmp_path, monkeypatch):
    stale = tmp_path / "registers.md"
    stale.write_text("old\n")
    monkeypatch.setattr(regmap_doc, "DOC_PATH", stale)
    class Args:
        write = False
        check = True
        json = False
    assert regmap_doc.run(Args()) == 1
    Args.check, Args.write = False, True
    assert regmap_doc.run(Args()) == 0
    Args.check, Args.write = True, False
    assert regmap_doc.run(Args()) == 0


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_command_round_trip(op, table, cid, count, lba, src, dst):
    cmd = Command(opcode=op, table=table, cid=cid, count=count, n_bags=count ^ 5, lba=lba, src_addr=src,
                  offsets_addr=src ^ dst, dst_addr=dst, dst_bytes=lba)
    raw = cmd.pack()
    assert len(raw) == regmap.COMMAND_BYTES
    assert Command.unpack(raw) == cmd
    # Field positions as documented: opcode byte 0, table byte 1, cid bytes 2-3, dst_addr dwords 8-9.
    assert raw[0] == op and raw[1] == table and int.from_bytes(raw[2:4], "little") == cid
    assert int.from_bytes(raw[32:40], "little") == dst


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 1), st.integers(0, 255))
def test_completion_round_trip(n_bad, first_bad, sq_head, cid, phase, status):
    cpl = Completion(n_bad, first_bad, sq_head, cid, phase, status)
    raw = cpl.pack()
    assert len(raw) == regmap.COMPLETION_BYTES
    assert Completion.unpack(raw) == cpl
    assert raw[15] == status and (raw[14] & 1) == phase


def test_div_magic_exact_for_every_rows_per_page():
    rng = random.Random(1)
    xs = [0, 1, 2**32 - 1, 2**32 - 2, 2**31] + [rng.getrandbits(32) for _ in range(200)]
    for d in range(1, 4097):
        m = regmap.div_magic(d)
        assert m.magic < 2**33
        for x in xs + [d * 7, d * 7 - 1, (2**32 - 1) // d * d]:
            assert m.divide(x) == x // d, (d, x)


@pytest.mark.parametrize("bad", [dict(n_channels=0), dict(n_channels=9), dict(host_data_bits=48),
                                 dict(page_size=3000), dict(pages_per_channel=1000), dict(max_row_bytes=6)])
def test_params_reject_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        Params(**bad)


def test_hash_is_stable_across_processes():
    out = subprocess.run([sys.executable, "-c", "from evssd.hw import regmap; print(regmap.REGMAP_HASH)"],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) == regmap.REGMAP_HASH
