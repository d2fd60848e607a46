"""The RL loop's components, in the order of one step: rollouts.py / async_rollouts.py (rank 0: prompts -> batch,
evaluation), learner.py (old log-probs, updates), publisher.py (the one owner of the served weights),
recorder.py (metrics.jsonl, then MLflow, summary, plots), checkpointer.py (save, retention, resume state).
trainer.py puts them in order; none of them imports the trainer."""
