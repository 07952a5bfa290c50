"""transformers_bcos.evaluation: GridPG, sampling, EPG, post-hoc explainers, sliding windows, metrics."""

import math
import os

import pytest
import torch
from conftest import IMAGE_SIZE, NUM_LABELS, SAVED_RULE_FAMILIES, tiny_source_model

from transformers_bcos import bcosify_pretrained
from transformers_bcos.evaluation import (
    Attribution,
    BcosExplainer,
    ConfidentImages,
    Explainer,
    GradCAMExplainer,
    IntegratedGradientsExplainer,
    PixelClassifier,
    SlidingWindowExplainer,
    boxes_to_masks,
    build_grid,
    completeness_errors,
    default_smoothing,
    energy_pointing_game_scores,
    evaluate_energy_pointing_game,
    evaluate_grid_pointing_game,
    grid_pointing_game_scores,
    make_explainer,
    sample_grids,
    select_confident_images,
    top1_accuracy,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    # Other test files and training runs share the 2 cores: oversubscription is ~40x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# GridPG scoring on synthetic maps
# ----------------------------------------------------------------------------------------------


def _cell_slice(cell: int, grid_size: int, cell_px: int):
    row, col = divmod(cell, grid_size)
    return slice(row * cell_px, (row + 1) * cell_px), slice(col * cell_px, (col + 1) * cell_px)


@pytest.mark.parametrize("grid_size", [2, 3])
def test_gridpg_all_mass_inside_target_cell_scores_one(grid_size):
    cell_px, cells = 8, grid_size * grid_size
    maps = torch.zeros(cells, grid_size * cell_px, grid_size * cell_px)
    generator = torch.Generator().manual_seed(0)
    for cell in range(cells):
        rows, cols = _cell_slice(cell, grid_size, cell_px)
        maps[cell, rows, cols] = torch.rand(cell_px, cell_px, generator=generator)
    # Negative evidence elsewhere must not count: only positive mass is scored.
    maps[maps == 0] = -1.0
    scores = grid_pointing_game_scores(maps, grid_size, torch.arange(cells))
    assert torch.allclose(scores, torch.ones(cells, dtype=scores.dtype))


@pytest.mark.parametrize("grid_size", [2, 3])
def test_gridpg_uniform_map_scores_one_over_n(grid_size):
    cells = grid_size * grid_size
    maps = torch.full((cells, 12 * grid_size, 12 * grid_size), 0.7)
    scores = grid_pointing_game_scores(maps, grid_size, torch.arange(cells))
    assert torch.allclose(scores, torch.full((cells,), 1 / cells, dtype=scores.dtype))


def test_gridpg_uniform_map_with_smoothing_stays_one_over_four_by_symmetry():
    scores = grid_pointing_game_scores(torch.ones(4, 32, 32), 2, torch.arange(4), smoothing=5)
    assert torch.allclose(scores, torch.full((4,), 0.25, dtype=scores.dtype))


def test_gridpg_negative_only_and_zero_maps_score_zero():
    maps = torch.stack([-torch.rand(16, 16), torch.zeros(16, 16)])
    assert grid_pointing_game_scores(maps, 2, [0, 3]).tolist() == [0.0, 0.0]


def test_gridpg_known_split_scores_known_fraction():
    maps = torch.zeros(2, 3, 18, 18)  # per-channel maps are summed over channels first
    maps[0, 0, 0:6, 6:12] = 1.0  # 36 units of mass in cell 1 (top middle)
    maps[0, 1, 12:18, 12:18] = 0.5  # 18 units in cell 8
    maps[0, 2, 6:12, 0:6] = -3.0  # negative evidence: ignored
    maps[1, 0, 7, 7] = 3.0  # cell 4 (centre): 3 units
    maps[1, 0, 0, 0] = 1.0  # cell 0: 1 unit
    scores = grid_pointing_game_scores(maps, 3, [1, 4])
    assert scores.tolist() == pytest.approx([36 / 54, 3 / 4])


def test_gridpg_smoothing_spreads_mass_across_the_cell_border():
    # A single positive pixel at row 3, col 1 of an 8×8 map (2×2 grid of 4-px cells). A 3×3
    # average pool spreads it over rows 2-4 × cols 0-2: 6 of the 9 pixels lie in cell 0.
    maps = torch.zeros(1, 8, 8)
    maps[0, 3, 1] = 1.0
    assert grid_pointing_game_scores(maps, 2, [0]).item() == pytest.approx(1.0)
    assert grid_pointing_game_scores(maps, 2, [0], smoothing=3).item() == pytest.approx(6 / 9)


def test_default_smoothing_follows_the_papers_and_skips_tiny_cells():
    assert default_smoothing(224) == 15
    assert default_smoothing(28) == 1
    assert default_smoothing(112) % 2 == 1 and 7 <= default_smoothing(112) <= 9


def test_gridpg_rejects_bad_inputs_with_clear_messages():
    with pytest.raises(ValueError, match="does not divide"):
        grid_pointing_game_scores(torch.zeros(1, 9, 9), 2, [0])
    with pytest.raises(ValueError, match="cells must lie"):
        grid_pointing_game_scores(torch.zeros(1, 8, 8), 2, [4])
    with pytest.raises(ValueError, match="odd"):
        grid_pointing_game_scores(torch.zeros(1, 8, 8), 2, [0], smoothing=4)


def test_build_grid_tiles_row_major():
    cells = torch.arange(9, dtype=torch.float32).view(9, 1, 1, 1).expand(9, 3, 2, 2)
    grid = build_grid(cells, 3)
    assert grid.shape == (3, 6, 6)
    for cell in range(9):
        rows, cols = _cell_slice(cell, 3, 2)
        assert (grid[:, rows, cols] == cell).all()


# ----------------------------------------------------------------------------------------------
# Grid sampling
# ----------------------------------------------------------------------------------------------


def _per_class(num_classes=10, per_class=30):
    return {c: [c * 1000 + i for i in range(per_class)] for c in range(num_classes)}


@pytest.mark.parametrize("grid_size", [2, 3])
def test_sampler_never_repeats_a_class_and_takes_each_class_in_confidence_order(grid_size):
    per_class = _per_class()
    sample = sample_grids(per_class, grid_size, num_grids=25, seed=7)
    assert len(sample.grids) == 25 and sample.stop_reason is None
    next_rank = {c: 0 for c in per_class}
    for grid in sample.grids:
        classes = [c for c, _ in grid]
        assert len(grid) == grid_size**2
        assert len(set(classes)) == len(classes)  # no class twice in a grid
        for c, index in grid:  # each class's next most confident image, never reused
            assert index == per_class[c][next_rank[c]]
            next_rank[c] += 1


def test_sampler_is_deterministic_for_a_seed():
    first = sample_grids(_per_class(), 3, 40, seed=42).grids
    assert sample_grids(_per_class(), 3, 40, seed=42).grids == first
    assert sample_grids(_per_class(), 3, 40, seed=43).grids != first
    # Dict order must not matter, only the content and the seed.
    reversed_order = dict(reversed(list(_per_class().items())))
    assert sample_grids(reversed_order, 3, 40, seed=42).grids == first


def test_sampler_reports_classes_running_out():
    per_class = {0: [1, 2, 3], 1: [4, 5, 6], 2: [7], 3: [8], 4: []}
    sample = sample_grids(per_class, 2, num_grids=10)
    # The first grid needs all four classes that have images; then only classes 0 and 1 are left.
    assert len(sample.grids) == 1
    assert sorted(c for c, _ in sample.grids[0]) == [0, 1, 2, 3]
    assert "after 1 grids only 2 classes" in sample.stop_reason and "needs 4 distinct classes" in sample.stop_reason


def test_sampler_stops_when_no_class_has_enough_images_left():
    per_class = {c: list(range(c * 10, c * 10 + 3)) for c in range(5)}  # 15 images, 5 classes
    sample = sample_grids(per_class, 2, num_grids=100, seed=1)
    assert 1 <= len(sample.grids) <= 15 // 4
    used = [i for grid in sample.grids for _, i in grid]
    assert len(used) == len(set(used))
    remaining = {c: 3 - sum(1 for grid in sample.grids for k, _ in grid if k == c) for c in per_class}
    assert sum(1 for left in remaining.values() if left > 0) < 4  # it stopped because it had to
    assert sample.stop_reason


def test_sampler_with_no_images_builds_nothing_and_says_why():
    sample = sample_grids({}, 3, 5)
    assert sample.grids == [] and "no test image is classified correctly with confidence" in sample.stop_reason
    sample = sample_grids({0: [1], 1: [2]}, 2, 5)
    assert sample.grids == [] and "only 2 classes" in sample.stop_reason


# ----------------------------------------------------------------------------------------------
# Confident images and the whole GridPG run
# ----------------------------------------------------------------------------------------------


def test_select_confident_images_applies_the_criterion_and_sorts_by_logit():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.tensor(
        [
            [2.0, -5.0, -5.0],  # correct, sigmoid 0.88
            [4.0, -5.0, -5.0],  # correct, more confident
            [-1.0, -5.0, -5.0],  # correct (argmax) but sigmoid 0.27: not confident under sigmoid
            [0.0, 3.0, -5.0],  # correct
            [3.0, 0.5, -5.0],  # wrong
            [-9.0, -9.0, -8.0],  # correct, sigmoid tiny, softmax 0.58
        ]
    )
    by_sigmoid = select_confident_images(None, torch.zeros(6, 3, 2, 2), labels, confidence="sigmoid", logits=logits)
    assert by_sigmoid.per_class == {0: [1, 0], 1: [3], 2: []}
    assert by_sigmoid.num_correct == 5 and by_sigmoid.num_confident == 3 and by_sigmoid.num_classes == 2
    by_softmax = select_confident_images(None, torch.zeros(6, 3, 2, 2), labels, confidence="softmax", logits=logits)
    assert by_softmax.per_class == {0: [1, 0, 2], 1: [3], 2: [5]}


def test_pixel_classifier_picks_sigmoid_for_bcos_and_softmax_for_standard_models():
    model, processor = tiny_source_model("resnet")
    assert PixelClassifier.wrap(model, processor).confidence_criterion == "softmax"
    assert PixelClassifier.wrap(bcosify_pretrained(model, image_processor=processor)).confidence_criterion == "sigmoid"
    assert PixelClassifier.wrap(model, processor, confidence="sigmoid").confidence_criterion == "sigmoid"


class ColourOracle(Explainer):
    """A stand-in explainer for checking the GridPG plumbing: the test images are flat colours
    whose value encodes the class, and the oracle marks exactly the pixels of the target class
    (or, inverted, of every other class)."""

    name = "oracle"

    def __init__(self, classifier, inverted=False):
        super().__init__(classifier)
        self.inverted = inverted

    def _explain(self, pixel_values, targets):
        is_target = (pixel_values[:, 0] - targets.view(-1, 1, 1).to(pixel_values.dtype) / 10).abs() < 1e-3
        return Attribution((is_target != self.inverted).to(pixel_values.dtype))


def _flat_colour_images(num_classes=10, per_class=5):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = (labels.float() / 10).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    confident = ConfidentImages(
        {c: torch.nonzero(labels == c).flatten().tolist() for c in range(num_classes)}, len(labels), len(labels), "given", 0.5
    )
    return images, labels, confident


@pytest.mark.parametrize("grid_size", [2, 3])
def test_gridpg_run_explains_each_cell_for_its_own_class(grid_size):
    images, labels, confident = _flat_colour_images()
    classifier = PixelClassifier.wrap(*tiny_source_model("resnet"))
    oracle = evaluate_grid_pointing_game(ColourOracle(classifier), images, labels, grid_size, 4, batch_size=3, confident=confident, progress=False)
    assert oracle.num_grids_built == 4 and oracle.scores.shape == (4, grid_size**2)
    assert oracle.mean == 1.0 and oracle.q1 == 1.0
    inverted = evaluate_grid_pointing_game(
        ColourOracle(classifier, inverted=True), images, labels, grid_size, 4, confident=confident, progress=False
    )
    assert inverted.mean == 0.0


def test_gridpg_on_a_freshly_converted_model_reports_no_confident_images():
    model, processor = tiny_source_model("resnet")
    explainer = make_explainer(bcosify_pretrained(model, image_processor=processor))
    images = torch.rand(20, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.arange(20) % NUM_LABELS
    result = evaluate_grid_pointing_game(explainer, images, labels, grid_size=2, num_grids=10, progress=False)
    assert result.num_confident_images == 0 and result.num_grids_built == 0
    assert math.isnan(result.mean)
    assert "0 of 10 grids" in result.report and "no test image is classified correctly with confidence" in result.report
    assert result.to_dict()["num_grids_built"] == 0


def test_gridpg_when_classes_run_out_scores_the_grids_it_could_build():
    model, processor = tiny_source_model("vit")
    explainer = make_explainer(model, "input_x_gradient", image_processor=processor)
    images, labels = torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 0, 0, 1, 1, 1, 2, 3])
    # Classes 2 and 3 have one confident image each: the second 2×2 grid cannot be built.
    confident = ConfidentImages({0: [0, 1, 2], 1: [3, 4, 5], 2: [6], 3: [7]}, 8, 8, "given", 0.5)
    result = evaluate_grid_pointing_game(explainer, images, labels, grid_size=2, num_grids=10, confident=confident, progress=False)
    assert result.num_grids_built == 1 and result.scores.shape == (1, 4)
    assert ((result.scores >= 0) & (result.scores <= 1)).all()
    assert "1 of 10 grids" in result.report and "only 2 classes still had unused confident images" in result.report


@pytest.mark.parametrize("family", SAVED_RULE_FAMILIES)
def test_gridpg_on_a_saved_rules_family_model_scores_its_own_complete_explanations(family, bcos_rules_folders, mnist_images):
    """A rules-family B-cos model loaded from its folder plays GridPG on grids twice its input size
    (no sliding window: DINOv2 interpolates its position embeddings, RegNet is convolutional); each
    score is the positive share in the cell of the model's own explanation of the grid."""
    classifier = PixelClassifier.from_pretrained(bcos_rules_folders[family])
    explainer = make_explainer(classifier)
    assert isinstance(explainer, BcosExplainer) and explainer.fixed_input_size is None
    images, digits = mnist_images
    labels = digits % NUM_LABELS
    # Every image counts as confident: a tiny random model classifies none of them with confidence.
    confident = ConfidentImages({c: torch.nonzero(labels == c).flatten().tolist() for c in range(NUM_LABELS)}, 16, 16, "given", 0.5)
    result = evaluate_grid_pointing_game(explainer, images, labels, 2, 2, batch_size=3, confident=confident, progress=False)
    assert result.num_grids_built == 2 and result.smoothing == 1  # 32-px cells: no smoothing
    model = classifier.model
    for g, cells in enumerate(sample_grids(confident.per_class, 2, 2).grids):
        grid = build_grid(images[[index for _, index in cells]], 2).unsqueeze(0).expand(4, -1, -1, -1)
        explanation = model.explain(grid, target=[target for target, _ in cells])
        positive = explanation.contributions.clamp_min(0)
        inside = torch.stack([positive[c, 32 * (c // 2) : 32 * (c // 2 + 1), 32 * (c % 2) : 32 * (c % 2 + 1)].sum() for c in range(4)])
        torch.testing.assert_close(result.scores[g], (inside / positive.sum((1, 2))).double(), rtol=1e-4, atol=1e-6)
        assert completeness_errors(explainer, grid, explanation.target, progress=False)["max_relative"] < 1e-4
    assert ((result.scores > 0) & (result.scores < 1)).all()  # real maps: neither empty nor all in one cell


# ----------------------------------------------------------------------------------------------
# Post-hoc explainers on tiny real transformers models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_integrated_gradients_is_complete_for_enough_steps(family, mnist_images):
    images, _ = mnist_images
    images, targets = images[:6], torch.arange(6) % NUM_LABELS
    model, processor = tiny_source_model(family)
    errors = {
        steps: completeness_errors(make_explainer(model, "integrated_gradients", processor, steps=steps), images, targets, progress=False)
        for steps in (4, 200)
    }
    # Σ IG = f(x) - f(black) up to the Riemann-sum error, which shrinks with more steps.
    assert errors[200]["max_relative"] < 2e-3
    assert errors[200]["max_relative"] < errors[4]["max_relative"]


def test_integrated_gradients_batching_does_not_change_the_result(mnist_images):
    images, _ = mnist_images
    model, processor = tiny_source_model("resnet")
    classifier = PixelClassifier.wrap(model, processor)
    targets = torch.tensor([0, 1, 2, 3])
    one_by_one = IntegratedGradientsExplainer(classifier, steps=16, internal_batch_size=1).explain(images[:4], targets)
    batched = IntegratedGradientsExplainer(classifier, steps=16, internal_batch_size=1000).explain(images[:4], targets)
    assert torch.allclose(one_by_one.maps, batched.maps, atol=1e-6)
    assert torch.allclose(one_by_one.explained_output, batched.explained_output, atol=1e-6)


def test_input_x_gradient_matches_finite_differences_in_pixel_space(mnist_images):
    images, _ = mnist_images
    model, processor = tiny_source_model("convnext")
    model.double()
    classifier = PixelClassifier.wrap(model, processor)
    x = images[:1].double()
    attribution = make_explainer(classifier, "input_x_gradient").explain(x, torch.tensor([2]))
    # Digit pixels (grey: equal channels), where x·Σ_c ∂f/∂x_c is the map's value.
    stroke = torch.nonzero(x[0, 0] > 0.2)
    for row, col in stroke[torch.randperm(len(stroke), generator=torch.Generator().manual_seed(0))[:5]].tolist():
        step = torch.zeros_like(x)
        step[:, :, row, col] = 1e-6
        with torch.no_grad():
            up, down = classifier(x + step).logits[0, 2], classifier(x - step).logits[0, 2]
        directional_derivative = (up - down) / 2e-6
        expected = (x[0, 0, row, col] * directional_derivative).item()
        assert attribution.maps[0, row, col].item() == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_post_hoc_methods_agree_with_captum():
    import captum.attr as captum_attr  # a dev extra (the library itself does not need it)
    model, processor = tiny_source_model("resnet")
    classifier = PixelClassifier.wrap(model.double(), processor)
    x, targets = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64), torch.tensor([0, 2, 4])

    def logits(pixels):
        return classifier(pixels).logits

    ig = captum_attr.IntegratedGradients(logits).attribute(x, baselines=0.0, target=targets, n_steps=32, method="riemann_middle")
    ours = make_explainer(classifier, "integrated_gradients", steps=32).explain(x, targets)
    assert torch.allclose(ours.maps, ig.sum(1), atol=1e-10)
    ixg = captum_attr.InputXGradient(logits).attribute(x.clone().requires_grad_(True), target=targets)
    assert torch.allclose(make_explainer(classifier, "input_x_gradient").explain(x, targets).maps, ixg.sum(1), atol=1e-10)


def test_grad_cam_uses_the_last_stage_of_a_cnn():
    from transformers.models.resnet.modeling_resnet import ResNetStage

    model, processor = tiny_source_model("resnet")
    classifier = PixelClassifier.wrap(model, processor)
    x, targets = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 1, 4])
    cam = GradCAMExplainer(classifier).explain(x, targets)
    # The same quantity computed independently, with a hook on the last ResNetStage module.
    last_stage = [m for m in model.modules() if isinstance(m, ResNetStage)][-1]
    captured = {}
    handle = last_stage.register_forward_hook(lambda module, inputs, output: captured.setdefault("features", output))
    try:
        with torch.enable_grad():
            logits = classifier(x.clone().requires_grad_(True)).logits
            (gradients,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured["features"])
    finally:
        handle.remove()
    expected = torch.relu((gradients.mean((2, 3), keepdim=True) * captured["features"]).sum(1, keepdim=True))
    expected = torch.nn.functional.interpolate(expected, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[:, 0]
    assert cam.explained_output is None
    assert torch.allclose(cam.maps, expected.detach(), atol=1e-6)
    assert cam.maps.abs().sum() > 0


def test_grad_cam_on_vit_tokens_is_not_zero():
    # Patch tokens after the last layer no longer reach the class token (zero gradient); the
    # explainer must use the tokens entering the last layer.
    model, processor = tiny_source_model("vit")
    cam = make_explainer(model, "grad_cam", processor).explain(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 3]))
    assert cam.maps.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert (cam.maps.flatten(1).amax(1) > 0).all()


def test_explainers_leave_no_gradient_and_restore_train_mode():
    model, processor = tiny_source_model("resnet")
    model.train()
    for method in ("input_x_gradient", "integrated_gradients", "grad_cam"):
        make_explainer(model, method, processor).explain(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 1]))
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bcos_explainer_is_complete_and_rejects_standard_models(mnist_images):
    images, _ = mnist_images
    model, processor = tiny_source_model("resnet")
    explainer = make_explainer(bcosify_pretrained(model, b=1.0, image_processor=processor))
    errors = completeness_errors(explainer, images[:8], torch.arange(8) % NUM_LABELS, progress=False)
    assert errors["max_relative"] < 1e-5
    with pytest.raises(TypeError, match="needs a B-cos model"):
        make_explainer(model, "bcos", processor)


# ----------------------------------------------------------------------------------------------
# Sliding windows for fixed-size ViTs
# ----------------------------------------------------------------------------------------------


def test_sliding_window_offsets_cover_the_image():
    assert SlidingWindowExplainer._offsets(64, 32, 16) == [0, 16, 32]
    assert SlidingWindowExplainer._offsets(56, 32, 16) == [0, 16, 24]
    assert SlidingWindowExplainer._offsets(32, 32, 16) == [0]


def test_fixed_size_models_get_sliding_windows_and_others_do_not():
    vit, vit_processor = tiny_source_model("vit")
    resnet, resnet_processor = tiny_source_model("resnet")
    assert isinstance(make_explainer(vit, "input_x_gradient", vit_processor), SlidingWindowExplainer)
    assert isinstance(make_explainer(bcosify_pretrained(vit, image_processor=vit_processor)), SlidingWindowExplainer)
    assert not isinstance(make_explainer(resnet, "input_x_gradient", resnet_processor), SlidingWindowExplainer)
    # Any model slides a window when asked, e.g. a CNN at its training size.
    windowed = make_explainer(resnet, "input_x_gradient", resnet_processor, window=(16, 16))
    assert isinstance(windowed, SlidingWindowExplainer) and windowed.window == (16, 16) and windowed.stride == (8, 8)


def test_sliding_window_sums_window_explanations_back_into_place():
    model, processor = tiny_source_model("vit")
    inner = make_explainer(model, "input_x_gradient", processor, sliding_window=False)
    sliding = make_explainer(model, "input_x_gradient", processor)
    grid, targets = torch.rand(2, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE), torch.tensor([1, 3])
    # One window size: explained directly.
    assert torch.equal(sliding.explain(grid[..., :IMAGE_SIZE, :IMAGE_SIZE], targets).maps, inner.explain(grid[..., :IMAGE_SIZE, :IMAGE_SIZE], targets).maps)
    # Twice the size: 3×3 windows of 32 px at stride 16, each explained and added in place.
    expected = torch.zeros(2, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE)
    for top in (0, 16, 32):
        for left in (0, 16, 32):
            window = (slice(top, top + IMAGE_SIZE), slice(left, left + IMAGE_SIZE))
            expected[:, window[0], window[1]] += inner.explain(grid[:, :, window[0], window[1]], targets).maps
    assert torch.allclose(sliding.explain(grid, targets).maps, expected, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the window"):
        sliding.explain(torch.rand(1, 3, 16, 16), torch.tensor([0]))


def test_sliding_window_bcos_vit_explanations_of_a_grid_stay_complete():
    model, processor = tiny_source_model("vit")
    explainer = make_explainer(bcosify_pretrained(model, b=1.0, image_processor=processor))
    grid = torch.rand(2, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE)
    errors = completeness_errors(explainer, grid, torch.tensor([0, 2]), progress=False)
    assert errors["max_relative"] < 1e-5


# ----------------------------------------------------------------------------------------------
# Energy pointing game
# ----------------------------------------------------------------------------------------------


def test_energy_pointing_game_scores():
    maps = torch.zeros(4, 10, 10)
    maps[0, 2:5, 3:7] = 1.0  # all positive mass in the box
    maps[1, 0, 0], maps[1, 3, 3] = 3.0, 1.0  # a quarter of it inside
    maps[2] = -1.0  # negative only
    maps[3, 2:5, 3:7] = -2.0
    maps[3, 0, 0] = 1.0  # the box holds only negative evidence
    boxes = torch.tensor([[3, 2, 7, 5]] * 4)  # (x0, y0, x1, y1)
    scores = energy_pointing_game_scores(maps, boxes=boxes)
    assert scores.tolist() == pytest.approx([1.0, 0.25, 0.0, 0.0])
    masks = boxes_to_masks(boxes, 10, 10)
    assert torch.equal(energy_pointing_game_scores(maps, masks=masks), scores)


def test_boxes_to_masks_takes_the_union_and_rounds_outwards():
    masks = boxes_to_masks([[(0, 0, 2, 2), (1.5, 1.2, 3.1, 2.0)]], 4, 5)
    expected = torch.zeros(1, 4, 5, dtype=torch.bool)
    expected[0, 0:2, 0:2] = True
    expected[0, 1:2, 1:4] = True
    assert torch.equal(masks, expected)


def test_evaluate_energy_pointing_game_with_a_bcos_model():
    model, processor = tiny_source_model("resnet")
    explainer = make_explainer(bcosify_pretrained(model, image_processor=processor))
    images = torch.rand(5, 3, IMAGE_SIZE, IMAGE_SIZE)
    everything = torch.ones(5, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    result = evaluate_energy_pointing_game(explainer, images, torch.arange(5), masks=everything, batch_size=2, progress=False)
    has_positive = explainer.explain(images, torch.arange(5)).maps.flatten(1).amax(1) > 0
    assert result["scores"].tolist() == has_positive.double().tolist()  # whole-image mask: 1 if any positive mass


# ----------------------------------------------------------------------------------------------
# Accuracy and the evaluate modules
# ----------------------------------------------------------------------------------------------


def test_top1_accuracy_counts_argmax_hits(mnist_images):
    images, _ = mnist_images
    model, processor = tiny_source_model("resnet")
    with torch.no_grad():
        mean, std = torch.tensor(processor.image_mean).view(1, 3, 1, 1), torch.tensor(processor.image_std).view(1, 3, 1, 1)
        predictions = model(pixel_values=(images - mean) / std).logits.argmax(1)
    labels = predictions.clone()
    labels[:4] = (labels[:4] + 1) % NUM_LABELS  # four known mistakes
    assert top1_accuracy(model, images, labels, batch_size=5, progress=False, image_processor=processor) == pytest.approx(12 / 16)


@pytest.fixture(scope="module")
def evaluate_module():
    import evaluate  # a dev extra; the library itself does not need it

    def load(name):
        return evaluate.load(os.path.join(REPO, "metrics", name))

    return load


def test_evaluate_grid_pointing_game_module_loads_offline_and_matches_the_library(evaluate_module):
    metric = evaluate_module("grid_pointing_game")
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 12, 12, generator=generator)
    cells = [0, 1, 2, 3, 4, 8]
    result = metric.compute(predictions=maps.numpy(), references=cells, grid_size=3, return_scores=True)
    expected = grid_pointing_game_scores(maps, 3, cells)
    assert result["scores"] == pytest.approx(expected.tolist())
    assert result["mean"] == pytest.approx(expected.mean().item()) and result["num_maps"] == 6


def test_evaluate_energy_pointing_game_and_accuracy_modules(evaluate_module):
    epg = evaluate_module("energy_pointing_game").compute(predictions=[[[1.0, 3.0], [0.0, -2.0]]], references=[[[0, 1], [1, 1]]])
    assert epg["mean"] == pytest.approx(0.75)
    accuracy = evaluate_module("accuracy")
    accuracy.add_batch(predictions=[0, 1, 2], references=[0, 1, 1])
    accuracy.add_batch(predictions=[3], references=[3])
    assert accuracy.compute() == {"accuracy": 0.75, "num_examples": 4}
