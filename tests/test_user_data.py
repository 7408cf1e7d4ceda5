"""User data for classification: every file format, label mapping, splits, image folders, errors.

Fixtures are tiny files written to tmp_path; models are tiny random configs saved as
Hugging Face directories (text) or the packaged ``small_cnn`` (images).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lava_peft.cli import main
from lava_peft.data.labelled import LabelMap, labelled_texts, split_indices
from lava_peft.data.user_files import UserDataError, read_split_tables, read_table
from lava_peft.train.user_tasks import build_user_task, label_map_of_run

from _tiny_lm import tiny_tokenizer

ROWS = [
    {"text": "a warm, funny film", "pair": "first", "label": "pos"},
    {"text": 'he said "dull"', "pair": "second", "label": "neg"},
    {"text": "line one\nline two", "pair": "third", "label": "pos"},
    {"text": "empty and long", "pair": "fourth", "label": "neg"},
    {"text": "a small delight", "pair": "fifth", "label": "pos"},
]


def write_csv(path, rows, delimiter=","):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT classifier directory with a real byte-level BPE tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("bert")
    tok = tiny_tokenizer(chat_template=False)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)
    BertForSequenceClassification(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


# ----------------------------------------------------------------------------- readers
def _all_formats(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {
        "csv": write_csv(tmp_path / "d.csv", ROWS),
        "tsv": write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t"),
        "jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS),
        "json": tmp_path / "d.json",
        "parquet": tmp_path / "d.parquet",
        "saved": tmp_path / "saved",
    }
    files["json"].write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), str(files["parquet"]))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(files["saved"]))
    return files


def test_every_format_reads_the_same_rows(tmp_path):
    files = _all_formats(tmp_path)
    for name, path in files.items():
        table = read_table(path)
        assert table.rows == ROWS, name
        assert table.columns == ["text", "pair", "label"], name
    # the light reader of a saved data set (pyarrow only) agrees with datasets.load_from_disk
    assert read_table(files["saved"], backend="builtin").rows == read_table(files["saved"], backend="datasets").rows
    # places: the CSV row after a quoted two-line field starts on line 6 (header 1, rows 2, 3, 4-5, 6, 7)
    assert read_table(files["csv"]).places == ["line 2", "line 3", "line 4", "line 6", "line 7"]
    assert read_table(files["jsonl"]).places == [f"line {i}" for i in range(1, 6)]


def test_saved_dataset_dict_gives_its_validation_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                               "validation": datasets.Dataset.from_list(ROWS[3:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    for backend in ("builtin", "datasets"):
        train, held = read_split_tables(tmp_path / "dd", backend)
        assert train.rows == ROWS[:3] and held.rows == ROWS[3:]
        assert "[validation]" in held.source


# ----------------------------------------------------------------------------- labels and splits
def test_label_maps():
    strings = LabelMap.from_values(["pos", "neg", "pos", "mixed"])
    assert strings.names == ("mixed", "neg", "pos") and not strings.integer
    assert [strings.encode(v, "x") for v in ["pos", "neg", "mixed"]] == [2, 1, 0]
    ids = LabelMap.from_values([2, 0, 1, 0])
    assert ids.names == ("0", "1", "2") and ids.integer and ids.encode(2, "x") == 2
    signed = LabelMap.from_values([-1, 1, 1])
    assert signed.names == ("-1", "1") and signed.encode(-1, "x") == 0 and signed.encode(1, "x") == 1
    assert LabelMap.from_json(json.loads(json.dumps(strings.to_json()))) == strings
    with pytest.raises(UserDataError, match="not one of the training labels"):
        strings.encode("other", "f.csv, line 9")


def test_csv_integer_labels_become_ints(tmp_path):
    rows = [{"text": f"t{i}", "label": str(i % 3)} for i in range(6)]
    texts = labelled_texts(read_table(write_csv(tmp_path / "i.csv", rows)))
    assert texts.labels == [0, 1, 2, 0, 1, 2]
    assert LabelMap.from_values(texts.labels).names == ("0", "1", "2")


def test_split_is_seeded_disjoint_and_complete():
    a = split_indices(50, 0.2, seed=3)
    assert a == split_indices(50, 0.2, seed=3) and a != split_indices(50, 0.2, seed=4)
    train, held = a
    assert len(held) == 10 and sorted(train + held) == list(range(50))


def test_pair_column_is_tokenized_as_a_pair(tmp_path, bert_dir):
    rows = [dict(r) for r in ROWS] * 4
    task = build_user_task(bert_dir, str(write_jsonl(tmp_path / "p.jsonl", rows)), text_column="text",
                           pair_column="pair", eval_split=0.25, max_len=32)
    tok = task.tokenizer
    held_first = task.eval["input_ids"][0][task.eval["attention_mask"][0].bool()].tolist()
    texts = labelled_texts(read_table(tmp_path / "p.jsonl"), pair_column="pair")
    _, eval_idx = split_indices(len(texts), 0.25, 0)
    i = eval_idx[0]
    assert held_first == tok(texts.texts[i], texts.pairs[i])["input_ids"]
    assert task.label_map.names == ("neg", "pos")
    assert task.model.config.id2label == {0: "neg", 1: "pos"}


# ----------------------------------------------------------------------------- through `lava train`
def test_lava_train_on_a_csv_saves_and_restores_the_label_mapping(tmp_path, bert_dir):
    rows = [{"review": f"{w} film number {i}", "stars": w} for i in range(30) for w in ["good", "bad", "ok"]][:60]
    data = write_csv(tmp_path / "my.csv", rows)
    eval_rows = [{"review": "a good one", "stars": "good"}, {"review": "a bad one", "stars": "bad"}]
    eval_data = write_csv(tmp_path / "held.csv", eval_rows)
    out = tmp_path / "run"
    code = main(["train", "--model", bert_dir, "--data", str(data), "--eval-data", str(eval_data), "--text-column",
                 "review", "--label-column", "stars", "--out", str(out), "--method", "lora", "--max-steps", "2",
                 "--batch-size", "8", "--max-len", "32", "--no-progress", "--threads", "1"])
    assert code == 0
    restored = label_map_of_run(out)
    assert restored.names == ("bad", "good", "ok")
    info = json.loads((out / "run.json").read_text())
    assert info["user_data"]["eval_rows"] == 2 and info["user_data"]["held_out"] == "--eval-data"
    assert info["cli"]["label_column"] == "stars"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_samples"] == 2 and summary["train_samples"] == 60


def _image_folder(root, classes, per_class=4, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_image_folder_task_and_run(tmp_path):
    root = _image_folder(tmp_path / "imgs", ["cat", "dog", "eel"])
    task = build_user_task("small_cnn", str(root), eval_split=0.25, image_size=16)
    assert task.label_map.names == ("cat", "dog", "eel")
    assert task.train["x"].shape == (9, 3, 16, 16) and task.eval["x"].shape == (3, 3, 16, 16)
    # the pixels are those of the files: the first held-out image, read independently
    from PIL import Image

    from lava_peft.data import to_image_tensor

    _, eval_idx = split_indices(12, 0.25, 0)
    files = sorted(root.glob("*/*.png"))
    expected = to_image_tensor(np.asarray(Image.open(files[eval_idx[0]]).convert("RGB")), size=16)
    torch.testing.assert_close(task.eval["x"][:1], expected)
    assert task.eval["labels"][0].item() == eval_idx[0] // 4
    code = main(["train", "--model", "small_cnn", "--data", str(root), "--out", str(tmp_path / "run"), "--method",
                 "lava", "--max-steps", "1", "--batch-size", "4", "--image-size", "16", "--eval-split", "0.25",
                 "--no-progress", "--threads", "1"])
    assert code == 0 and label_map_of_run(tmp_path / "run").names == ("cat", "dog", "eel")


# ----------------------------------------------------------------------------- errors: one line, exit code 2
def _bad_files(tmp_path):
    good = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(10)]
    (tmp_path / "badfields.csv").write_text("text,label\nfine,a\ntoo,many,fields\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": \n')
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header_only.csv").write_text("text,label\n")
    (tmp_path / "notes.txt").write_text("hello")
    return {
        "missing column": (write_csv(tmp_path / "a.csv", good), ["--label-column", "stars"], "no column 'stars'"),
        "one class": (write_csv(tmp_path / "one.csv", [{"text": f"t{i}", "label": "a"} for i in range(10)]), [],
                      "at least two"),
        "wrong field count": (tmp_path / "badfields.csv", [], "line 3: 3 fields"),
        "bad json line": (tmp_path / "bad.jsonl", [], "line 2: not valid JSON"),
        "empty label": (write_jsonl(tmp_path / "nolabel.jsonl", good[:3] + [{"text": "x", "label": ""}] + good[3:]),
                        [], "line 4: the label"),
        "empty file": (tmp_path / "empty.csv", [], "is empty"),
        "no rows": (tmp_path / "header_only.csv", [], "holds no rows"),
        "empty split": (write_csv(tmp_path / "two.csv", good[:2]), [], "empty held-out split"),
        "unseen eval label": (write_csv(tmp_path / "a2.csv", good),
                              ["--eval-data", str(write_csv(tmp_path / "ev.csv", [{"text": "x", "label": "zzz"}]))],
                              "line 2: label 'zzz'"),
        "unknown suffix": (tmp_path / "notes.txt", [], "unknown file type"),
        "missing file": (tmp_path / "nope.csv", [], "does not exist"),
        "vision model on a table": (write_csv(tmp_path / "a3.csv", good), ["--model", "small_cnn"], "vision model"),
    }


def test_user_errors_are_one_line_and_exit_code_2(tmp_path, bert_dir, capsys):
    for case, (path, extra, message) in _bad_files(tmp_path).items():
        args = ["train", "--model", bert_dir, "--data", str(path), "--out", str(tmp_path / f"run-{len(case)}"),
                "--no-progress", "--threads", "1", *extra]
        if "--model" in extra:
            args = args[:1] + args[3:]
        capsys.readouterr()
        assert main(args) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("lava train: error: "), (case, err)
        assert message in err, (case, err)


def test_image_folder_with_one_class_is_refused(tmp_path):
    root = _image_folder(tmp_path / "one", ["cat"])
    (tmp_path / "one" / "dog").mkdir()  # an empty class folder does not count
    with pytest.raises(UserDataError, match="at least two classes"):
        build_user_task("small_cnn", str(root))
    bad = _image_folder(tmp_path / "bad", ["cat", "dog"])
    (bad / "dog" / "9.png").write_bytes(b"not a png")
    with pytest.raises(UserDataError, match=r"9\.png: unreadable image"):
        build_user_task("small_cnn", str(bad))
