"""The one-screen summary printed at the end of a run."""

from __future__ import annotations


def fmt_time(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m{s:02d}s"


def fmt_metric(name: str, value) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4f}"


def render_summary(s: dict) -> str:
    metric = s.get("metric", "accuracy")
    lines = [
        ("run dir", s["output_dir"]),
        ("model", s["model"]),
        ("trainable", f"{s['trainable_params']:,d} of {s['total_params']:,d} parameters "
                      f"({100 * s['trainable_params'] / max(1, s['total_params']):.3f}%)"),
        ("data", f"{s['train_samples']:,d} train" + (f" / {s['eval_samples']:,d} eval" if s.get("eval_samples") else "") + " samples"),
        ("steps", f"{s['steps']} optimizer steps ({s['epochs']:.2f} epochs), global batch {s['global_batch']}"
                  + (f", resumed at step {s['resumed_from_step']}" if s.get("resumed_from_step") else "")),
        ("time", f"{fmt_time(s['train_seconds'])} training ({s['samples_per_second']:.1f} samples/s), "
                 f"{fmt_time(s['eval_seconds'])} evaluating; {s['device']}, {s['precision']}, world size {s['world_size']}"),
        ("train loss", f"{s['final_train_loss']:.4f} (mean of the last logged window)" if s.get("final_train_loss") is not None else "n/a"),
    ]
    if s.get("final_eval"):
        ev = s["final_eval"]
        text = f"{metric} {fmt_metric(metric, ev.get(metric))}, loss {ev.get('loss', float('nan')):.4f}"
        if s.get("best_metric") is not None:
            text += f"; best {fmt_metric(metric, s['best_metric'])} at step {s['best_step']}"
        if s.get("baseline_eval"):
            text += f"; before training {fmt_metric(metric, s['baseline_eval'].get(metric))}"
        lines.append(("eval", text))
    files = s.get("files", {})
    first = True
    for key, path in files.items():
        lines.append(("files" if first else "", f"{key + ':':9s} {path}"))
        first = False
    width = max(len(v) for _, v in lines) + 15
    bar = "─" * min(width, 110)
    out = [bar, " lava-peft training summary", bar]
    out += [f" {k:12s} {v}" for k, v in lines]
    out.append(bar)
    return "\n".join(out)
