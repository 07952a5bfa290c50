"""Grid pointing game (GridPG) as an `evaluate` module, loadable offline by path:

    metric = evaluate.load("metrics/grid_pointing_game")
    metric.compute(predictions=maps, references=target_cells, grid_size=2)

The scoring is `transformers_bcos.evaluation.grid_pointing_game_scores`, the same code that
`evaluate_grid_pointing_game` uses.
"""

import datasets
import evaluate
import numpy
import torch
from transformers_bcos.evaluation.grid_pointing_game import grid_pointing_game_scores

_DESCRIPTION = """
The grid pointing game (Böhle et al., CVPR 2022) measures how well attribution maps localise the
explained class. Images of n = g² distinct classes are tiled into a g×g grid and the grid is
explained for one cell's class; the score is the positive attribution mass inside that cell over
the total positive mass (0 when there is none). Uniform maps score 1/n, perfect ones 1.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: attribution maps of the grids, each an H×W array (summed over channels), with H
        and W multiples of `grid_size`.
    references: the target cell of each map, row-major, in 0 .. grid_size² - 1.
    grid_size: g, for g×g grids (2 or 3 in the papers). Default 2.
    smoothing: odd average-pool kernel applied to the maps before clamping at 0 (15 for 224-px
        cells; 1, no smoothing, for tiny images). Default 1.
    return_scores: also return the score of every map. Default False.
Returns:
    mean, median, q1, q3: statistics of the scores; num_maps: how many maps were scored;
    scores (with return_scores=True).
Example:
    >>> metric = evaluate.load("metrics/grid_pointing_game")
    >>> maps = numpy.zeros((1, 4, 4)); maps[0, :2, :2] = 1.0
    >>> metric.compute(predictions=maps, references=[0], grid_size=2)["mean"]
    1.0
"""

_CITATION = """
@inproceedings{bohle2022bcos,
  title={B-cos Networks: Alignment is All We Need for Interpretability},
  author={B{\"o}hle, Moritz and Fritz, Mario and Schiele, Bernt},
  booktitle={CVPR},
  year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GridPointingGame(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, grid_size=2, smoothing=1, return_scores=False):
        maps = torch.as_tensor(numpy.asarray(predictions, dtype=numpy.float64))
        scores = grid_pointing_game_scores(maps, grid_size, references, smoothing).numpy()
        result = {
            "mean": float(scores.mean()),
            "median": float(numpy.median(scores)),
            "q1": float(numpy.quantile(scores, 0.25)),
            "q3": float(numpy.quantile(scores, 0.75)),
            "num_maps": int(scores.shape[0]),
        }
        if return_scores:
            result["scores"] = scores.tolist()
        return result
