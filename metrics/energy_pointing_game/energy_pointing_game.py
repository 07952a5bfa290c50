"""Energy pointing game (EPG) as an `evaluate` module, loadable offline by path:

    metric = evaluate.load("metrics/energy_pointing_game")
    metric.compute(predictions=maps, references=masks)

The scoring is `transformers_bcos.evaluation.energy_pointing_game_scores`.
"""

import datasets
import evaluate
import numpy
import torch
from transformers_bcos.evaluation.energy_pointing_game import energy_pointing_game_scores

_DESCRIPTION = """
The energy pointing game (Wang et al., Score-CAM, 2020): the fraction of an attribution map's
positive mass that lies inside the object's mask (or bounding boxes, rasterised to a mask). A map
without positive mass scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: attribution maps, each an H×W array (summed over channels).
    references: the object masks, each an H×W array of 0/1 (1 = object pixel).
    return_scores: also return the score of every map. Default False.
Returns:
    mean, median: statistics of the scores; num_maps; scores (with return_scores=True).
Example:
    >>> metric = evaluate.load("metrics/energy_pointing_game")
    >>> metric.compute(predictions=[[[1.0, 3.0]]], references=[[[0, 1]]])["mean"]
    0.75
"""

_CITATION = """
@inproceedings{wang2020scorecam,
  title={Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks},
  author={Wang, Haofan and Wang, Zifan and Du, Mengnan and Yang, Fan and Zhang, Zijian and Ding, Sirui and Mardziel, Piotr and Hu, Xia},
  booktitle={CVPR Workshops},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EnergyPointingGame(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int8"))),
                }
            ),
        )

    def _compute(self, predictions, references, return_scores=False):
        maps = torch.as_tensor(numpy.asarray(predictions, dtype=numpy.float64))
        masks = torch.as_tensor(numpy.asarray(references) != 0)
        scores = energy_pointing_game_scores(maps, masks=masks).numpy()
        result = {"mean": float(scores.mean()), "median": float(numpy.median(scores)), "num_maps": int(scores.shape[0])}
        if return_scores:
            result["scores"] = scores.tolist()
        return result
