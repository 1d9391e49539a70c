"""TGLoRA: task-grouped LoRA for multi-task dense prediction, as a PEFT method."""
