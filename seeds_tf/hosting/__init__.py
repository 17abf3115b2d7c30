"""The platform around a run: admission of trainings, TensorBoard, rclone copies, health checks."""
