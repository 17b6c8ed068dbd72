from ovd.evaluation.ov_eval import evaluate_detections, format_metrics, load_detections, parse_iou_types

__all__ = ["evaluate_detections", "format_metrics", "load_detections", "parse_iou_types"]
