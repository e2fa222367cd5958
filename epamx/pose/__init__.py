"""Keypoints from raw videos: the pose estimator interface, MediaPipe Pose behind it, and ``epamx keypoints``,
which writes a PoseC3D annotation pickle of every video's keypoints (README: "Your own video")."""
from epamx.pose.estimator import COCO17_JOINTS, PoseEstimator, load_estimator
from epamx.pose.extract import extract_keypoints, parts_folder, video_annotation
from epamx.pose.videos import Video, find_videos, labels_from_file, labels_from_folders, read_splits

__all__ = ["COCO17_JOINTS", "PoseEstimator", "Video", "extract_keypoints", "find_videos", "labels_from_file",
           "labels_from_folders", "load_estimator", "parts_folder", "read_splits", "video_annotation"]
