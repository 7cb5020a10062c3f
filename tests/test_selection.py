"""Which entries are selected: threshold, exact budget, targets."""

import pytest
import torch
from torch import nn

import sara_train
from sara_train.engine.selection import find_targets, kth_smallest_magnitude, select_entries


def test_kth_smallest_matches_sorting() -> None:
    generator = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(37, 11, generator=generator),
        torch.randn(500, generator=generator) * 1e-3,
        torch.randn(3, 4, 5, 5, generator=generator),
    ]
    magnitudes = torch.cat([w.abs().flatten() for w in weights]).sort().values
    for k in (1, 2, 17, 400, magnitudes.numel()):
        cut = kth_smallest_magnitude(weights, k)
        assert cut.value == magnitudes[k - 1].item()
        assert cut.count_below == int((magnitudes < magnitudes[k - 1]).sum())


def test_threshold_selects_exactly_the_small_entries(tiny_net: nn.Module) -> None:
    weights = {"proj": tiny_net.proj.weight, "head": tiny_net.head.weight}
    threshold, indices = select_entries(weights, sara_train.SaRAConfig(threshold=0.05))
    assert threshold == 0.05
    for name, w in weights.items():
        expected = (w.detach().flatten().abs() < 0.05).nonzero().squeeze(1)
        assert indices[name].dtype == torch.int32
        assert torch.equal(indices[name].long(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_budget_count_is_exact_even_with_ties(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    # bf16/fp16 weights have many equal magnitudes: the budget must still be met exactly
    weights = {f"w{i}": (torch.randn(64, 64, generator=generator) * 0.01).to(dtype) for i in range(3)}
    for budget in (1, 100, 1234, 0.05, 0.5):
        threshold, indices = select_entries(weights, sara_train.SaRAConfig(budget=budget))
        k = budget if isinstance(budget, int) else round(budget * 3 * 64 * 64)
        assert sum(i.numel() for i in indices.values()) == k
        selected = torch.cat([weights[n].flatten()[i.long()].abs().float() for n, i in indices.items()])
        assert bool((selected < threshold).all())
        unselected_min = min(
            float(
                torch.cat(
                    [
                        w.flatten().abs().float()[torch.isin(torch.arange(w.numel()), indices[n].long(), invert=True)]
                        if n in indices
                        else w.flatten().abs().float()
                    ]
                ).min()
            )
            for n, w in weights.items()
        )
        assert float(selected.max()) <= unselected_min
        for i in indices.values():
            assert bool((i[1:] > i[:-1]).all())


@pytest.mark.parametrize("budget", [1, 300, 0.25, 1.0])
def test_largest_selection_is_the_complement_of_the_smallest(budget: float | int) -> None:
    generator = torch.Generator().manual_seed(5)
    weights = {f"w{i}": (torch.randn(32, 40, generator=generator) * 0.01).half() for i in range(3)}  # many ties
    total = 3 * 32 * 40
    k = budget if isinstance(budget, int) else round(budget * total)
    threshold, largest = select_entries(weights, sara_train.SaRAConfig(budget=budget, selection="largest"))
    assert threshold is None
    assert sum(i.numel() for i in largest.values()) == k
    chosen = torch.cat([weights[n].flatten()[i.long()].abs().float() for n, i in largest.items()])
    others = torch.cat(
        [
            w.flatten().abs().float()[torch.isin(torch.arange(w.numel()), largest[n].long(), invert=True)]
            if n in largest
            else w.flatten().abs().float()
            for n, w in weights.items()
        ]
    )
    assert others.numel() == total - k
    if others.numel():
        assert float(chosen.min()) >= float(others.max())


def test_random_selection_is_seeded_uniform_and_exact() -> None:
    weights = {"a": torch.zeros(100, 50), "b": torch.zeros(300)}  # magnitudes play no part
    select = lambda seed: select_entries(
        weights, sara_train.SaRAConfig(budget=0.1, selection="random", selection_seed=seed)
    )[1]
    first, again, other = select(0), select(0), select(1)
    assert sum(i.numel() for i in first.values()) == 530
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    assert 450 < first["a"].numel() < 550  # spread in proportion: "a" holds 5000 of the 5300 entries
    assert first["b"].numel() > 0


def test_only_a_smallest_selection_has_a_progressive_step() -> None:
    model = nn.Linear(20, 20)
    handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.2, selection="largest"))
    assert handle.num_trainable == 80
    with pytest.raises(sara_train.SaRAError, match="'largest' selection has none"):
        handle.reselect()
    assert handle.delta().selection == {"threshold": None, "budget": 0.2, "selection": "largest"}


def test_targets_patterns_bias_and_norm(tiny_net: nn.Module) -> None:
    names = lambda cfg: [t.name for t in find_targets(tiny_net, cfg)]
    assert names(sara_train.SaRAConfig()) == ["conv.weight", "proj.weight", "head.weight"]
    assert names(sara_train.SaRAConfig(include=["^pro"])) == ["proj.weight"]
    assert names(sara_train.SaRAConfig(exclude=["conv", "head"])) == ["proj.weight"]
    assert "proj.bias" in names(sara_train.SaRAConfig(include_bias=True))
    assert {"norm.weight", "norm.bias"} <= set(names(sara_train.SaRAConfig(include_norm=True)))
    with pytest.raises(sara_train.SaRAError, match="no tensors to train"):
        find_targets(tiny_net, sara_train.SaRAConfig(include=["nothing-matches"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 1e-3, "budget": 0.1}, "either threshold or budget"),
        ({"budget": 1.5}, "fractional budget"),
        ({"budget": 0}, "count budget"),
        ({"threshold": -1.0}, "threshold must be a finite number > 0"),
        ({"threshold": float("nan")}, "threshold must be a finite number > 0"),
        ({"budget": float("nan")}, "fractional budget"),
        ({"include": ["attn("]}, "include pattern 'attn\\(' is not a valid regex"),
        ({"selection": "median"}, "selection must be one of"),
        ({"selection": "largest", "threshold": 0.1}, "takes a budget, not a threshold"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(sara_train.SaRAError, match=message):
        sara_train.SaRAConfig(**kwargs)
