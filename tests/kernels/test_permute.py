"""expert_layout, capacity_keep, gather_rows, combine_rows against plain references.

Each test runs the Triton kernel (the interpreter on CPU) and the torch fallback.
"""

import pytest
import torch

from flashfusemoe.kernels import permute


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(permute, "use_triton", lambda t: False)
    return request.param


def random_ids(n, k, e, device):
    """Top-k style ids: k distinct experts per token, in random order."""
    return torch.rand(n, e).argsort(dim=1)[:, :k].to(torch.int32).to(device)


def ref_layout(ids, e_total, m, keep):
    """Python-loop layout, straight from the definition in docs/design.md."""
    flat = ids.reshape(-1).tolist()
    a_total = len(flat)
    kept = [True] * a_total if keep is None else keep.reshape(-1).tolist()
    kept_counts = [0] * e_total
    all_counts = [0] * e_total
    for a, ex in enumerate(flat):
        all_counts[ex] += 1
        kept_counts[ex] += kept[a]
    r_total = e_total * m if m > 0 else a_total
    starts = [sum(kept_counts[:ex]) for ex in range(e_total)]
    assign_to_row = [-1] * a_total
    row_to_assign = [-1] * r_total
    rank = [0] * e_total
    for a, ex in enumerate(flat):
        if not kept[a]:
            continue
        q = rank[ex]
        rank[ex] += 1
        if m > 0:
            if q >= m:
                continue
            row = ex * m + q
        else:
            row = starts[ex] + q
        assign_to_row[a] = row
        row_to_assign[row] = a
    if m > 0:
        ends = [ex * m + min(kept_counts[ex], m) for ex in range(e_total)]
    else:
        ends = [starts[ex] + kept_counts[ex] for ex in range(e_total)]
    placed = sum(r >= 0 for r in assign_to_row)
    return assign_to_row, row_to_assign, ends, all_counts, [a_total - placed]


def check_layout(ids, e_total, m, keep):
    got = permute.expert_layout(ids, e_total, m, keep)
    want = ref_layout(ids, e_total, m, keep)
    names = ("assign_to_row", "row_to_assign", "expert_ends", "tokens_per_expert", "num_unplaced")
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == torch.int32, name
        # Exact comparison of the whole tensor: every element must have been written.
        assert g.cpu().tolist() == w, name
    return got


# The second shape has A > the kernel block: ranks carry across blocks.
@pytest.mark.parametrize("n,k,e", [(53, 3, 7), (permute._LAYOUT_BLOCK // 2 + 77, 2, 5)])
@pytest.mark.parametrize("m", [0, 4, 1000])
@pytest.mark.parametrize("with_keep", [False, True])
def test_layout_random(backend, device, n, k, e, m, with_keep):
    ids = random_ids(n, k, e, device)
    keep = (torch.rand(n * k) < 0.7).to(device) if with_keep else None
    got = check_layout(ids, e, m, keep)
    if m == 4:
        assert got[4].item() > 0  # the test exercises padded overflow


@pytest.mark.parametrize("m", [0, 3])
def test_layout_edge_cases(backend, device, m):
    # All assignments on one expert (others empty), the rest edge shapes.
    check_layout(torch.full((40, 1), 2, dtype=torch.int32, device=device), 5, m, None)
    check_layout(torch.full((40, 2), 3, dtype=torch.int32, device=device), 4, m, None)
    sparse = torch.randint(0, 2, (30, 1), device=device).to(torch.int32) * 5  # only experts 0 and 5
    check_layout(sparse, 8, m, torch.rand(30, device=device) < 0.5)
    check_layout(torch.zeros(17, 1, dtype=torch.int32, device=device), 1, m, None)  # E = 1
    check_layout(random_ids(9, 4, 4, device), 4, m, None)  # K = E
    check_layout(random_ids(1, 2, 6, device), 6, m, None)  # N = 1
    check_layout(random_ids(5, 2, 3, device), 3, m, torch.zeros(10, dtype=torch.bool, device=device))
    check_layout(torch.zeros(0, 2, dtype=torch.int32, device=device), 3, m, None)  # N = 0


def ref_capacity_keep(ids, weights, e_total, capacity):
    flat_ids = ids.reshape(-1).tolist()
    flat_w = weights.reshape(-1).double().tolist()
    keep = [False] * len(flat_ids)
    for ex in range(e_total):
        mine = [a for a, i in enumerate(flat_ids) if i == ex]
        mine.sort(key=lambda a: (-flat_w[a], a))
        for a in mine[:capacity]:
            keep[a] = True
    return keep


@pytest.mark.parametrize("tied", [False, True])
def test_capacity_keep(device, tied):
    n, k, e = 70, 2, 5
    ids = random_ids(n, k, e, device)
    if tied:  # few distinct values: ties decide most of the choices
        w = torch.randint(0, 3, (n, k)).float() / 2
    else:
        w = torch.rand(n, k)
    w = w.to(device)
    for capacity in (0, 1, 7, 28, 200):
        keep = permute.capacity_keep(ids, w, e, capacity)
        assert keep.dtype == torch.bool and keep.shape == (n * k,)
        assert keep.cpu().tolist() == ref_capacity_keep(ids, w, e, capacity), capacity
    empty = permute.capacity_keep(ids[:0], w[:0], e, 3)
    assert empty.shape == (0,)


def layout_for(n, k, e, m, device, drop=True):
    ids = random_ids(n, k, e, device)
    keep = (torch.rand(n * k) < 0.8).to(device) if drop else None
    return permute.expert_layout(ids, e, m, keep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("m", [0, 6])
def test_gather_rows(backend, device, dtype, m):
    n, k, e, d = 37, 2, 5, 300  # d spans two 256-wide blocks, the second one partial
    _, row_to_assign, *_ = layout_for(n, k, e, m, device)
    src = torch.randn(n, d, dtype=torch.float64).to(dtype).to(device)
    out = permute.gather_rows(src, row_to_assign, k)
    r2a = row_to_assign.cpu().tolist()
    want = torch.stack([src[a // k].cpu() if a >= 0 else torch.zeros(d, dtype=dtype) for a in r2a])
    assert out.dtype == dtype and out.shape == (len(r2a), d)
    assert torch.equal(out.cpu(), want)  # a pure copy: exact


def test_gather_rows_empty(backend, device):
    src = torch.randn(0, 8, device=device)
    out = permute.gather_rows(src, torch.full((6,), -1, dtype=torch.int32, device=device), 2)
    assert torch.equal(out.cpu(), torch.zeros(6, 8))
    out = permute.gather_rows(src, torch.zeros(0, dtype=torch.int32, device=device), 2)
    assert out.shape == (0, 8)


def ref_combine(rows, assign_to_row, k, weights, router=None):
    """Float64 result, the sum of the absolute values of its terms (error scale) and that of
    the router terms alone (tf32 products for 16-bit outputs)."""
    n = assign_to_row.numel() // k
    rows64 = rows.cpu().double()
    out = torch.zeros(n, rows.shape[1], dtype=torch.float64)
    scale = torch.zeros_like(out)
    router_scale = torch.zeros_like(out)
    a2r = assign_to_row.cpu().tolist()
    for tok in range(n):
        for j in range(k):
            r = a2r[tok * k + j]
            if r >= 0:
                w = 1.0 if weights is None else weights[tok, j].item()
                out[tok] += w * rows64[r]
                scale[tok] += abs(w) * rows64[r].abs()
        if router is not None:
            g, w = router[0][tok].cpu().double(), router[1].cpu().double()
            out[tok] += g @ w
            scale[tok] += g.abs() @ w.abs()
            router_scale[tok] += g.abs() @ w.abs()
    return out, scale, router_scale


def check_combine(out, want, scale, router_scale, acc_dtype, roundings=24):
    """Accumulating K products and E router products costs at most about 2(K + E) roundings of
    the accumulator (eps each) relative to the sum of |terms|: 24 eps covers K + E <= 11. A 16-bit
    output adds one final rounding below one ulp (truncation in the interpreter): 2^-7 relative for
    bf16, 2^-10 for fp16."""
    eps = torch.finfo(acc_dtype).eps
    rel_out = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}.get(out.dtype, 0.0)
    err = (out.cpu().double() - want).abs()
    # 16-bit outputs take the router term's products in tf32 (10-bit mantissa): 2^-10 each
    tf32 = 2.0**-10 if out.dtype in (torch.bfloat16, torch.float16) else 0.0
    bound = roundings * eps * scale + rel_out * want.abs() + tf32 * router_scale
    assert bool((err <= bound).all()), (err - bound).max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("m", [0, 8])
@pytest.mark.parametrize("with_weights,with_router", [(True, False), (False, True), (True, True)])
def test_combine_rows(backend, device, dtype, m, with_weights, with_router):
    n, k, e, d = 41, 3, 6, 300
    assign_to_row, row_to_assign, *_ = layout_for(n, k, e, m, device)
    rows = torch.randn(row_to_assign.numel(), d, dtype=torch.float64).to(dtype).to(device)
    rows[row_to_assign < 0] = float("nan")  # unused rows are never read
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(n, k, dtype=acc, device=device) if with_weights else None
    router = None
    if with_router:  # logit_grad [N, E] in the accumulation dtype, router_weight [E, D] like rows
        router = (torch.randn(n, e, dtype=acc, device=device), torch.randn(e, d, device=device).to(dtype))
    kw = dict(weights=weights, logit_grad=router and router[0], router_weight=router and router[1])
    out = permute.combine_rows(rows, assign_to_row, k, **kw)
    assert out.dtype == dtype and out.shape == (n, d)
    check_combine(out, *ref_combine(rows, assign_to_row, k, weights, router), acc)
    again = permute.combine_rows(rows, assign_to_row, k, **kw)
    assert torch.equal(out, again)  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 24, 300])
def test_combine_rows_router_term_many_experts(backend, device, dtype, d):
    """The router term's tiles at narrow and wide rows with 70 experts (on a GPU, tiles chosen for
    fp32 once needed more shared memory than a program has in fp64, and at d=1 in fp32)."""
    n, k, e = 41, 3, 70
    assign_to_row, row_to_assign, *_ = layout_for(n, k, e, 0, device)
    rows = torch.randn(row_to_assign.numel(), d, dtype=dtype, device=device)
    weights = torch.rand(n, k, dtype=dtype, device=device)
    router = (torch.randn(n, e, dtype=dtype, device=device), torch.randn(e, d, dtype=dtype, device=device))
    out = permute.combine_rows(rows, assign_to_row, k, weights=weights, logit_grad=router[0],
                               router_weight=router[1])
    check_combine(out, *ref_combine(rows, assign_to_row, k, weights, router), dtype, roundings=2 * (k + e))


def test_combine_rows_out_dtype_and_empty(backend, device):
    n, k, e, d = 23, 2, 4, 70
    assign_to_row, row_to_assign, *_ = layout_for(n, k, e, 0, device)
    rows = torch.randn(row_to_assign.numel(), d).to(torch.bfloat16).to(device)
    weights = torch.rand(n, k, device=device)
    out = permute.combine_rows(rows, assign_to_row, k, weights=weights, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    check_combine(out, *ref_combine(rows, assign_to_row, k, weights, None), torch.float32)
    empty = permute.combine_rows(rows[:0], assign_to_row[:0], k, weights=weights[:0])
    assert empty.shape == (0, d) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("with_router", [False, True])
def test_combine_rows_into_out(backend, device, with_router):
    n, k, e, d = 23, 2, 4, 70
    assign_to_row, row_to_assign, *_ = layout_for(n, k, e, 0, device)
    rows = torch.randn(row_to_assign.numel(), d, device=device)
    kw = dict(weights=torch.rand(n, k, device=device))
    if with_router:
        kw = dict(logit_grad=torch.randn(n, e, device=device), router_weight=torch.randn(e, d, device=device))
    want = permute.combine_rows(rows, assign_to_row, k, **kw)
    out = torch.full((n, d), float("nan"), device=device)
    assert permute.combine_rows(rows, assign_to_row, k, out=out, **kw) is out
    assert torch.equal(out, want)
    empty_out = torch.full((0, d), float("nan"), device=device)
    assert permute.combine_rows(rows[:0], assign_to_row[:0], k, out=empty_out) is empty_out
    for bad in (torch.empty(n, d + 1, device=device), torch.empty(n, d, dtype=torch.float64, device=device),
                torch.empty(d, n, device=device).t()):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            permute.combine_rows(rows, assign_to_row, k, out=bad, **kw)


@pytest.mark.gpu
def test_no_host_sync(device):
    n, k, e = 300, 2, 8
    ids = random_ids(n, k, e, device)
    w = torch.rand(n, k, device=device)
    x = torch.randn(n, 64, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        keep = permute.capacity_keep(ids, w, e, 60)
        for m in (0, 40):
            a2r, r2a, *_ = permute.expert_layout(ids, e, m, keep)
            rows = permute.gather_rows(x, r2a, k)
            permute.combine_rows(rows, a2r, k, weights=w, logit_grad=w @ w.new_ones(k, e),
                                 router_weight=x.new_ones(e, 64))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def block_counts_of(ids, e_total, block_n):
    """[cdiv(N, block_n), E] assignments per token block and expert (what the routing kernel writes)."""
    n = ids.shape[0]
    counts = torch.zeros((n + block_n - 1) // block_n, e_total, dtype=torch.int32)
    for tok, row in enumerate(ids.cpu().tolist()):
        for e in row:
            counts[tok // block_n, e] += 1
    return counts.to(ids.device)


@pytest.mark.parametrize(
    "n,k,e,block_n",
    [(100, 2, 8, 16), (37, 3, 5, 16), (64, 8, 8, 16), (1, 1, 1, 16), (300, 1, 4, 16), (50, 4, 128, 16)],
)
@pytest.mark.parametrize("programs", [128, 2])
def test_layout_and_gather_equals_layout_then_gather(backend, device, n, k, e, block_n, programs,
                                                     monkeypatch):
    monkeypatch.setattr(permute, "_LAYOUT_PROGRAMS", programs)  # 2: several token blocks per program
    ids = random_ids(n, k, e, device)
    if n == 300:
        ids[:] = 2  # every token on one expert, the others empty
    x = torch.randn(n, 24, device=device).to(torch.bfloat16)
    got = permute.layout_and_gather(x, ids, e, block_counts_of(ids, e, block_n), block_n)
    maps = permute.expert_layout(ids, e)
    want = (permute.gather_rows(x, maps[1], k), *maps)
    for name, g, w in zip(["x_sorted", "assign_to_row", "row_to_assign", "expert_ends", "tokens", "unplaced"],
                          got, want):
        assert torch.equal(g.cpu(), w.cpu()), name
    assert torch.equal(got[0].cpu(), x.cpu()[got[2].long().cpu() // k])  # and it is the gather


@pytest.mark.parametrize("with_counts", [True, False])  # the fused kernel, or layout then gather
def test_layout_and_gather_into_out(backend, device, with_counts):
    n, k, e, block_n = 50, 2, 6, 16
    ids = random_ids(n, k, e, device)
    x = torch.randn(n, 24, device=device)
    counts = block_counts_of(ids, e, block_n) if with_counts else None
    want = permute.layout_and_gather(x, ids, e, counts, block_n)
    out = permute.Layout(*(torch.full_like(t, -7) for t in want[1:]))
    out = out._replace(tokens_per_expert=None)  # left to the wrapper
    got = permute.layout_and_gather(x, ids, e, counts, block_n, out=out)
    for i, buffer in enumerate(out):
        assert buffer is None or got[1 + i] is buffer
    for g, wt in zip(got, want, strict=True):
        assert torch.equal(g, wt)
    out = out._replace(row_to_assign=torch.empty(n * k + 1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"out.row_to_assign must be a contiguous"):
        permute.layout_and_gather(x, ids, e, counts, block_n, out=out)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("capacity", [0, 1, 5, 40])
def test_capacity_drop_matches_capacity_keep(backend, device, wdtype, capacity):
    n, k, e = 60, 2, 4
    ids = random_ids(n, k, e, device)
    ids[: n // 2, 0] = 1  # overload expert 1
    # few distinct values: many exact ties, which must go to the lower token
    weights = (torch.randint(0, 4, (n, k)).to(wdtype) / 4).to(device)
    x = torch.randn(n, 20, dtype=torch.float64, device=device)
    x_sorted, a2r, r2a, ends, tokens, _ = permute.layout_and_gather(x, ids, e, None, 0)
    dropped = permute.capacity_drop(x_sorted, weights, a2r, r2a, ends, capacity)
    keep = permute.capacity_keep(ids, weights, e, capacity)
    assert torch.equal((a2r >= 0).cpu(), keep.cpu())
    assert int(dropped) == int((~keep).sum())
    want_maps = permute.expert_layout(ids, e)  # rows stay where the dropless layout put them
    kept_rows = want_maps[0][keep]
    assert torch.equal(a2r[keep].cpu(), kept_rows.cpu())
    assert torch.equal(r2a[kept_rows.long()].cpu(), torch.nonzero(keep.cpu()).flatten().to(torch.int32))
    dropped_rows = want_maps[0][~keep].long()
    assert bool((r2a[dropped_rows] == -1).all()) and torch.count_nonzero(x_sorted[dropped_rows]) == 0
    kept_assignments = torch.nonzero(keep.cpu()).flatten()
    assert torch.equal(x_sorted[kept_rows.long()].cpu(), x.cpu()[kept_assignments // k])


@pytest.mark.parametrize("m", [0, 5])
def test_gather_rows_two_sources_in_one_launch(backend, device, m):
    n, k, e, d = 33, 2, 4, 40
    _, row_to_assign, *_ = layout_for(n, k, e, m, device)
    x, g = torch.randn(n, d, device=device), torch.randn(n, d, device=device)
    out, out2 = permute.gather_rows(x, row_to_assign, k, second=g)
    assert torch.equal(out, permute.gather_rows(x, row_to_assign, k))
    assert torch.equal(out2, permute.gather_rows(g, row_to_assign, k))


@pytest.mark.parametrize("n,k,e", [(37, 2, 5), (40, 8, 8), (1, 1, 1)])
def test_scatter_rows_equals_gather_rows(backend, device, n, k, e):
    d = 300  # two 256-wide column blocks, the second partial
    a2r, r2a, *_ = layout_for(n, k, e, 0, device, drop=False)
    x = torch.randn(n, d, device=device).to(torch.bfloat16)
    g = torch.randn(n, d, device=device).to(torch.bfloat16)
    assert torch.equal(permute.scatter_rows(x, a2r, k).cpu(), permute.gather_rows(x, r2a, k).cpu())
    out, out2 = permute.scatter_rows(x, a2r, k, second=g)
    assert torch.equal(out.cpu(), x.cpu()[r2a.long().cpu() // k])
    assert torch.equal(out2.cpu(), g.cpu()[r2a.long().cpu() // k])


@pytest.mark.parametrize("n", [0, 37])
def test_row_copies_into_out(backend, device, n):
    """``out=``: the rows land in the caller's buffer (NaN-filled first: every row is written);
    a buffer of the wrong shape or dtype, or one given with a second source, is refused."""
    k, e, d = 2, 5, 24
    a2r, r2a, *_ = layout_for(n, k, e, 0, device, drop=False)
    x = torch.randn(n, d, device=device)
    for copy, layout_map in ((permute.scatter_rows, a2r), (permute.gather_rows, r2a)):
        want = copy(x, layout_map, k)
        out = torch.full((n * k, d), float("nan"), device=device)
        assert copy(x, layout_map, k, out=out) is out
        assert torch.equal(out, want)
        with pytest.raises(ValueError, match=r"out must be a contiguous"):
            copy(x, layout_map, k, out=torch.empty(n * k, d, device=device, dtype=torch.float64))
        with pytest.raises(ValueError, match="out is for a one-source row copy"):
            copy(x, layout_map, k, second=x, out=out)


def test_scatter_rows_empty_and_bad_map(backend, device):
    x = torch.randn(0, 8, device=device)
    assert permute.scatter_rows(x, torch.zeros(0, dtype=torch.int32, device=device), 2).shape == (0, 8)
    with pytest.raises(ValueError, match="assign_to_row has 3 entries"):
        bad_map = torch.zeros(3, dtype=torch.int32, device=device)
        permute.scatter_rows(torch.randn(2, 8, device=device), bad_map, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_combine_rows_16bit_router_operands(backend, device, dtype):
    """The backward passes logit_grad in x's dtype: 16-bit products are exact in fp32."""
    n, k, e, d = 41, 3, 6, 300
    assign_to_row, row_to_assign, *_ = layout_for(n, k, e, 0, device)
    rows = torch.randn(row_to_assign.numel(), d).to(dtype).to(device)
    router = (torch.randn(n, e).to(dtype).to(device), torch.randn(e, d).to(dtype).to(device))
    out = permute.combine_rows(rows, assign_to_row, k, logit_grad=router[0], router_weight=router[1])
    assert out.dtype == dtype
    want, scale, _ = ref_combine(rows, assign_to_row, k, None, router)
    check_combine(out, want, scale, torch.zeros_like(scale), torch.float32)
