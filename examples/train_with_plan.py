"""Train the built-in tiny GPT for a few steps under a plan file: `python examples/train_with_plan.py plan.yaml`.

Make a plan first, e.g.

    auto-partition baselines gpt --mesh data=2,model=4 --strategies fsdp_tp --save plans/
    python examples/train_with_plan.py plans/fsdp_tp.yaml

The training script is ordinary JAX + optax; the plan is applied in one call,
`ap.load_plan(path).jit(train_step)`, which places every argument, output and intermediate the plan
names on the plan's mesh.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the arguments, sets up fake CPU devices if needed, and trains."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="a plan file made for the built-in gpt (tiny)")
    parser.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    args = parser.parse_args(argv)

    # Reading the plan does not start JAX, so the mesh size can choose the number of CPU devices.
    # The flag only affects JAX's CPU platform: on a GPU machine the plan's mesh must match the GPUs.
    from ir.plan_yaml import load_plan_file

    mesh = load_plan_file(args.plan).mesh
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={mesh.size}".strip()

    train(args.plan, args.steps)


def train(plan_path: str, steps: int) -> list[float]:
    """Runs `steps` AdamW steps of the tiny GPT on one random batch under the plan; returns the losses."""
    import jax
    import optax

    import auto_partition as ap
    from models import common, gpt, registry

    cfg = registry.config("gpt", "tiny")
    optimizer = optax.adamw(1e-3, weight_decay=0.01)

    def loss_fn(params, batch):
        logits = gpt.forward(params, batch["tokens"], cfg)  # [batch, seq, vocab]
        return common.cross_entropy(logits, batch["targets"])

    # The argument names give roles (params / opt_state / batch): keep them as the plan was made with.
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, _, batch = registry.get("gpt", "tiny").init(0)  # random weights and one random batch
    opt_state = optimizer.init(params)

    plan = ap.load_plan(plan_path)
    step = plan.jit(train_step, donate_argnums=(0, 1))
    print(
        f"plan {plan_path}: mesh {plan.mesh_shape} over {len(jax.devices())} {jax.devices()[0].platform} devices"
    )
    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
        print(f"step {i}: loss {losses[-1]:.4f}")
    kernel = params["layers_0"]["mlp"]["w_in"]
    print(f"params/layers_0/mlp/w_in {kernel.shape} is laid out as {kernel.sharding.spec}")
    return losses


if __name__ == "__main__":
    main()
