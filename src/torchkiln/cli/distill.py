"""``kiln distill RECIPE --teacher T --student S``: train a student with a teacher's soft targets on a
recipe's data and schedule, write it, print and record the teacher-vs-student table."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add ``kiln distill`` to ``app``."""

    @app.command("distill")
    def distill_command(
        recipe: Path = typer.Argument(
            ...,
            help="Recipe .toml: the data, the training settings and the teacher's architecture.",
            show_default=False,
        ),
        teacher: Path = typer.Option(
            ...,
            "--teacher",
            help="The trained teacher: the recipe model's weights (model.pt, step-*.pt) or a pruned .pt.",
            show_default=False,
        ),
        student: str = typer.Option(
            ...,
            "--student",
            help="The student: a pruned .pt file (from kiln prune) or a zoo model name (fresh weights).",
            show_default=False,
        ),
        temperature: float = typer.Option(4.0, "--temperature", "-T", help="Softening temperature (> 0)."),
        alpha: float = typer.Option(0.9, "--alpha", help="Weight of the soft (teacher) term, in [0, 1]."),
        cache_teacher: bool = typer.Option(
            True, "--cache-teacher/--no-cache-teacher", help="Compute the teacher's logits once per sample."
        ),
        epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs (default: the recipe's)."),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Student artifact (default runs/distill/<recipe name>-student.pt)."
        ),
        batch_size: int = typer.Option(
            32, "--batch-size", "-b", min=1, help="Batch of the latency comparison."
        ),
        threads: int = typer.Option(1, "--threads", "-t", min=1, help="torch.set_num_threads while timing."),
        max_time_s: float = typer.Option(
            5.0, "--max-time-s", min=0.1, help="Time budget of the latency rounds."
        ),
        set_: list[str] = typer.Option([], "--set", "-s", help="Recipe override, e.g. --set train.lr=0.01."),
        record: bool = typer.Option(True, "--record/--no-record", help="Record the run in the history."),
    ) -> None:
        """Distill: the student learns the teacher's softened outputs (KL at --temperature, T^2-scaled, mixed
        with the labels by --alpha) inside the recipe's training loop; the teacher is frozen and not saved.

        Typical flow: kiln train recipe.toml; kiln prune recipe.toml -w runs/x/model.pt -o pruned.pt;
        kiln distill recipe.toml --teacher runs/x/model.pt --student pruned.pt.
        """
        import tempfile

        import torch
        from rich.console import Console

        from torchkiln.cli.prune import _accuracy_fn, record_compress, resolve_model
        from torchkiln.compress.compare import compare_models
        from torchkiln.compress.distill import Distill, distill
        from torchkiln.compress.prune import load_pruned, read_pruned_metadata, save_pruned
        from torchkiln.errors import KilnError
        from torchkiln.zoo import create_model, list_models

        console = Console()
        if not str(recipe).endswith(".toml"):
            raise KilnError(f"{recipe}: kiln distill needs a recipe .toml (for the data and the schedule)")
        if not teacher.is_file():
            raise KilnError(f"--teacher {teacher}: no such file")
        try:
            from torchkiln.compress.prune import FORMAT

            is_pruned = torch.load(teacher, map_location="cpu", weights_only=True).get("format") == FORMAT
        except Exception:
            is_pruned = False
        if is_pruned:
            resolved = resolve_model(str(recipe), overrides=list(set_))
            resolved.model = load_pruned(teacher)
        else:
            resolved = resolve_model(str(recipe), weights=teacher, overrides=list(set_))
        teacher_model = resolved.model.eval()

        if student.endswith(".pt"):
            if not Path(student).is_file():
                raise KilnError(f"--student {student}: no such file")
            student_model = load_pruned(student)
            meta = read_pruned_metadata(student)["model_ref"]
            ref_name, ref_args = meta.get("name"), dict(meta.get("args") or {})
        elif student in list_models() or ":" in student:
            from torchkiln.train.from_recipe import infer_model_args

            ref_name = student
            ref_args = infer_model_args(student, {}, resolved.train_data)
            student_model = create_model(student, **ref_args)
        else:
            raise KilnError(
                f"--student {student!r} is neither a pruned .pt file nor a zoo model; zoo models: "
                f"{', '.join(list_models())}"
            )
        rec = resolved.recipe
        train_cfg = rec.train.model_copy(update={"progress": "off", "out_dir": None})
        if epochs is not None:
            train_cfg = train_cfg.model_copy(update={"epochs": epochs})
        config = Distill(temperature=temperature, alpha=alpha, cache_teacher=cache_teacher)
        console.print(
            f"[bold]kiln distill[/] {recipe}: teacher {teacher} -> student {student} (T={temperature:g}, "
            f"alpha={alpha:g}, {train_cfg.epochs} epochs)",
            highlight=False,
        )
        result = distill(
            student_model,
            teacher_model,
            resolved.train_data,
            resolved.val_data,
            config=config,
            train_config=train_cfg,
            batch_size=rec.data.batch_size,
        )
        student_model = result.model.eval()
        out_path = out or Path("runs") / "distill" / f"{resolved.name}-student.pt"
        save_pruned(student_model, out_path, model_ref=ref_name, model_args=ref_args)

        inputs = resolved.input_fn(batch_size)
        inputs = inputs if isinstance(inputs, (tuple, dict)) else tuple(inputs)
        with tempfile.TemporaryDirectory(prefix="kiln-distill-") as tmp:
            teacher_path = Path(tmp) / "teacher.pt"
            torch.save(teacher_model.state_dict(), teacher_path)
            report = compare_models(
                teacher_model,
                student_model,
                inputs,
                eval_fn=_accuracy_fn(resolved.val_data),
                artifacts={"before": teacher_path, "after": out_path},
                threads=threads,
                max_time_s=max_time_s,
                name=resolved.name,
                technique=f"distill T={temperature:g} alpha={alpha:g}",
            )
        console.print(report.table())
        for note in report.notes:
            console.print(f"note: {note}", highlight=False)
        console.print(f"student artifact: {out_path}  (before = teacher, after = student)", highlight=False)
        if record:
            run_id = record_compress(
                resolved.name,
                report.history_results({"train": result.summary()}),
                {
                    "recipe": str(recipe),
                    "set": list(set_),
                    "teacher": str(teacher),
                    "student": student,
                    "temperature": temperature,
                    "alpha": alpha,
                    "cache_teacher": cache_teacher,
                    "epochs": train_cfg.epochs,
                },
                {"student": str(out_path)},
            )
            console.print(f"recorded run [bold]{run_id}[/] (kiln history)", highlight=False)
