"""Supervised warm-start on synthetic traces: ``python recipes/sft.py --model PATH --task envs.arithmetic --out DIR``.

RL needs a policy that sometimes succeeds; this teaches a tiny model the answer format (and tool-call format for
tool environments) from the task module's ``synthetic_traces``.
"""

from __future__ import annotations

import argparse
import importlib
import json


def run_sft(model_path: str, task: str, out: str, num_examples: int = 2000, epochs: float = 2.0,
            learning_rate: float = 3e-3, seed: int = 0, task_kwargs: dict | None = None, max_length: int = 1024,
            batch_size: int = 32, chat_template: str | None = None) -> str:
    """SFT ``model_path`` on ``task``'s synthetic traces; ``max_length`` must hold a whole trace (longer ones are cut,
    losing their final answer). ``chat_template`` replaces the model's template (e.g. "hermes" for a chat model whose
    own template has no tools) and is saved with the output, so RL renders exactly what SFT trained on."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlfw.assets import load_tokenizer

    traces = importlib.import_module(task).synthetic_traces(num_examples, seed=seed, **(task_kwargs or {}))
    tokenizer = load_tokenizer(model_path, chat_template)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = SFTConfig(
        output_dir=out, num_train_epochs=epochs, learning_rate=learning_rate, per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine", warmup_steps=10, logging_steps=20, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_pin_memory=False, seed=seed,
        max_length=max_length, disable_tqdm=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=traces, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="envs.arithmetic")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-examples", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task-kwargs", default="{}", help="JSON options of the task's synthetic_traces")
    parser.add_argument("--max-length", type=int, default=1024, help="token limit of one trace")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chat-template", default=None,
                        help="replace the model's chat template: 'hermes' (tools for ChatML models) or a Jinja file")
    args = parser.parse_args()
    run_sft(args.model, args.task, args.out, args.num_examples, args.epochs, args.learning_rate, args.seed,
            json.loads(args.task_kwargs), args.max_length, args.batch_size, args.chat_template)


if __name__ == "__main__":
    main()
