"""benchmarks/sass_cost.py on a hand-made SASS listing whose counts are known, so that a parser
or loop-finding bug cannot make the static cost check (tests/test_triton_aot.py) pass by
counting nothing."""
import pytest

from benchmarks import sass_cost

# cuobjdump -sass layout: an instruction a line (and its encoding), some with the encoding's
# second half on a line of its own.
#   0x0000-0x0060  prologue with a try-wait retry (2 instructions: no loop); an ignored row
#                  stores and exits
#   0x0070-0x0170  the main loop, closed by an unconditional branch after its exit test:
#                  3 + (inner loop 0x00a0-0x0110: 8) x trips + 6, the 6 counting the MUFU.LG2
#                  that a branch skips (the longest path takes it)
#   0x0180-0x01a0  an atomic and EXIT; after the last EXIT, the trap and an out-of-line
#                  retry that branches back into the body (no loops; the branch there is
#                  not taken)
SASS = """
	code for sm_90a
		Function : _toy_kernel
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   S2R R0, SR_CTAID.X ;                  /* 0x0000000000007919 */
                                                                         /* 0x000fe20000000800 */
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P5, [UR4], R4 ;
                                                                         /* 0x000fe20000000800 */
        /*0020*/              @!P5 BRA 0x10 ;                            /* 0x0000000000007919 */
                                                                         /* 0x000fe20000000800 */
        /*0030*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;     /* 0x0000000000007919 */
        /*0040*/               @P0 BRA 0x70 ;                            /* 0x0000000000007919 */
        /*0050*/                   STG.E desc[UR4][R2.64], RZ ;          /* 0x0000000000007919 */
        /*0060*/                   EXIT ;                                /* 0x0000000000007919 */
        /*0070*/                   LDG.E.128 R4, desc[UR4][R2.64] ;      /* 0x0000000000007919 */
        /*0080*/                   MUFU.EX2 R5, R4 ;                     /* 0x0000000000007919 */
        /*0090*/                   FADD R6, R5, R6 ;                     /* 0x0000000000007919 */
        /*00a0*/                   LDG.E.64 R8, desc[UR4][R2.64] ;       /* 0x0000000000007919 */
        /*00b0*/                   FMUL R9, R8, R8 ;                     /* 0x0000000000007919 */
        /*00c0*/                   FMUL R9, R8, R8 ;                     /* 0x0000000000007919 */
        /*00d0*/                   FMUL R9, R8, R8 ;                     /* 0x0000000000007919 */
        /*00e0*/                   FMUL R9, R8, R8 ;                     /* 0x0000000000007919 */
        /*00f0*/                   FMUL R9, R8, R8 ;                     /* 0x0000000000007919 */
        /*0100*/                   IADD3 R1, R1, 0x1, RZ ;               /* 0x0000000000007919 */
        /*0110*/              @!P1 BRA 0xa0 ;                            /* 0x0000000000007919 */
        /*0120*/               @P2 BRA 0x140 ;                           /* 0x0000000000007919 */
        /*0130*/                   MUFU.LG2 R7, R6 ;                     /* 0x0000000000007919 */
        /*0140*/                   SHFL.BFLY PT, R3, R6, 0x1, 0x1f ;     /* 0x0000000000007919 */
        /*0150*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;         /* 0x0000000000007919 */
        /*0160*/               @P3 BRA 0x180 ;                           /* 0x0000000000007919 */
        /*0170*/                   BRA 0x70 ;                            /* 0x0000000000007919 */
        /*0180*/              @!P4 BRA 0x1c0 ;                           /* 0x0000000000007919 */
        /*0190*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R4 ;
        /*01a0*/                   EXIT ;                                /* 0x0000000000007919 */
        /*01b0*/                   BRA 0x1b0;                            /* 0x0000000000007919 */
        /*01c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR4], R4 ;
        /*01d0*/              @!P4 BRA 0x1c0 ;                           /* 0x0000000000007919 */
        /*01e0*/                   BRA 0x190 ;                           /* 0x0000000000007919 */
        /*01f0*/                   NOP;                                  /* 0x0000000000007919 */
"""


@pytest.fixture
def insts():
    funcs = sass_cost.parse(SASS)
    assert list(funcs) == ["_toy_kernel"]
    return funcs["_toy_kernel"]


def test_sass_cost_parses_instructions(insts):
    assert len(insts) == 32
    assert insts[4] == sass_cost.Inst(0x40, "BRA", 0x70, True)
    assert insts[6] == sass_cost.Inst(0x60, "EXIT", -1, False)
    assert insts[23] == sass_cost.Inst(0x170, "BRA", 0x70, False)
    assert insts[25].op == "REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU"
    assert insts[27] == sass_cost.Inst(0x1B0, "BRA", 0x1B0, False)


def test_sass_cost_finds_the_loops(insts):
    (outer,) = sass_cost.loops(insts)   # not the retries, the return or the trap
    assert (insts[outer.lo].addr, insts[outer.hi].addr) == (0x70, 0x170)
    (inner,) = outer.inner
    assert (insts[inner.lo].addr, insts[inner.hi].addr, inner.inner) == (0xA0, 0x110, [])


def test_sass_cost_counts_the_main_loop(insts):
    for trips in (0, 1, 2.5):
        counts = sass_cost.loop_cost(insts, 0, (trips,))
        assert counts.total() == 9 + 8 * trips
        assert counts["MUFU.LG2"] == 1 and counts["FMUL"] == 5 * trips
    with pytest.raises(AssertionError, match="1 nested loops but 0 trip counts"):
        sass_cost.loop_cost(insts, 0)
    with pytest.raises(AssertionError, match="no loop 1"):
        sass_cost.loop_cost(insts, 1, (1,))


def test_sass_cost_counts_the_whole_kernel(insts):
    # 5 to the branch, 3 iterations of 9 + 8 x 2, then the try-wait's branch (to the retry, out
    # of line: not taken), the atomic and EXIT; not the ignored row's 7
    counts = sass_cost.loop_cost(insts, None, (3, 2))
    assert counts.total() == 5 + 3 * (9 + 8 * 2) + 3
    assert counts["STG.E"] == 0 and counts["EXIT"] == 1


def test_sass_cost_summary_per_element(insts):
    s = sass_cost.summary(sass_cost.loop_cost(insts, 0, (2,)), elements=4)
    assert s["instructions"] == 25 / 4 and s["ex2"] == 1 / 4 and s["mufu"] == 2 / 4
    assert s["loads"] == {128: 1, 64: 2} and s["stores"] == {}
    assert (s["bar"], s["shfl"], s["mma"], s["atomic_bytes"]) == (1, 1, 0, 0)
    s = sass_cost.summary(sass_cost.loop_cost(insts, None, (1, 0)), elements=1)
    assert s["atomic_bytes"] == 16   # F32x4


def test_sass_cost_ceilings_on_an_h200():
    # docs/design.md: a forward moving 4 B an element is memory-bound below ~31 instructions
    # and ~3.9 exponentials an element, a backward moving 6 B below ~46 instructions
    instructions, mufu = sass_cost.ceilings(4)
    assert instructions == pytest.approx(31.1, abs=0.1) and mufu == pytest.approx(3.89, abs=0.01)
    assert sass_cost.ceilings(6)[0] == pytest.approx(46.7, abs=0.1)
