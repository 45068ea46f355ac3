"""Convert knowledge edits into the contradictory-question task's JSONL, and read that format back.

The task: fine-tune an LM to ask questions about a subject whose answers, by a frozen base LM, contradict an
edit fact (judged by an NLI model). One example per line:

  {"id": "shakespeare-1", "subject": "William Shakespeare", "edit_fact": "...", "true_fact": "...", "prompt": "..."}

id, subject and edit_fact are always written; true_fact (the original fact) and prompt (a question stem) are
optional.

  python convert_data.py counterfact.json data/counterfact.jsonl --limit 1000
  python convert_data.py my_edits.csv data/my_edits.jsonl

Inputs, by extension: .json (a JSON list of records; JSON lines saved as .json are read too), .jsonl (one
JSON record a line, blank lines skipped), .csv (a header row, then one example a row). The first record decides
what the records are:
  - CounterFact: {"case_id": 0, "requested_rewrite": {"subject": "Danielle Darrieux",
    "prompt": "The mother tongue of {} is", "target_true": {"str": "French"}, "target_new": {"str": "English"}}}
    gives edit_fact "The mother tongue of Danielle Darrieux is English." and true_fact "... is French.";
  - flat CounterFact: the same keys at the top level (a record with target_new and no edit_fact), where
    target_true / target_new may also be plain strings;
  - the task format itself (anything else, and every CSV): subject, edit_fact, optional id, true_fact, prompt.

Conventions:
  - errors say where: "line N" is the 1-based line of the file (for CSV the header is line 1, so the first
    example is line 2), "record N" the 1-based position in a JSON list;
  - an example without an id gets the 1-based position of its record in the file ("1", "2", ...);
    CounterFact ids are str(case_id);
  - optional fields that are missing, null or blank are left out (a CSV can only say "none" with a blank cell);
  - text fields are stripped and runs of whitespace become one space; keys outside the format are dropped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys

from durable_files import atomic_write
from errors import OneLineErrorParser, UserError, run_cli

OPTIONAL_TEXT_FIELDS = ("true_fact", "prompt")
CSV_REQUIRED_COLUMNS = ("subject", "edit_fact")


# --------------------------------------------------------------------------------------------- reading records


def json_type(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def read_text(path: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a data file")
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would rename the first column.
        # newline="": keep line ends as they are, so CSV quoting and JSONL line numbers both see the real file.
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_jsonl_records(path: str, text: str) -> list[tuple[str, object]]:
    records = []
    # split on "\n" only: str.splitlines would also split inside JSON strings holding U+2028 or form feeds
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    return records


def read_json_records(path: str, text: str) -> list[tuple[str, object]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return read_jsonl_records(path, text)  # JSON lines saved with a .json name
        raise UserError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise UserError(
            f"{path}: expected a JSON list of records, got {json_type(data)} "
            f"(for one record a line, name the file .jsonl)"
        )
    return [(f"record {number}", record) for number, record in enumerate(data, start=1)]


def read_csv_records(path: str, text: str) -> list[tuple[str, object]]:
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)  # strict: an unclosed quote is an error
    try:
        header = next(rows, None)
    except csv.Error as exc:
        raise UserError(f"{path} line 1: malformed CSV: {exc}") from None
    if header is None:
        return []
    columns = [name.strip() for name in header]
    for index, name in enumerate(columns, start=1):
        if not name:
            raise UserError(f"{path} line 1: column {index} of the header has no name")
        if columns.count(name) > 1:
            raise UserError(f"{path} line 1: column {name!r} appears more than once")
    for name in CSV_REQUIRED_COLUMNS:
        if name not in columns:
            raise UserError(f"{path} line 1: missing column {name!r}")
    records = []
    lines_read = rows.line_num
    while True:
        first_line = lines_read + 1  # a quoted cell may span lines: report where the row starts
        try:
            row = next(rows, None)
        except csv.Error as exc:
            raise UserError(f"{path} line {first_line}: malformed CSV: {exc}") from None
        if row is None:
            break
        lines_read = rows.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(columns):
            raise UserError(f"{path} line {first_line}: expected {len(columns)} cells like the header, got {len(row)}")
        records.append((f"line {first_line}", dict(zip(columns, row))))
    return records


READERS = {".json": read_json_records, ".jsonl": read_jsonl_records, ".csv": read_csv_records}


def read_records(path: str) -> list[tuple[str, object]]:
    """(location, record) pairs, location being "line N" or "record N"; records are not validated yet."""
    text = read_text(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in READERS:
        raise UserError(
            f"{path}: unsupported file type {extension or '(no extension)'!r}: expected .json, .jsonl or .csv"
        )
    return READERS[extension](path, text)


# ------------------------------------------------------------------------------------------ validating fields


def clean_text(text: str) -> str:
    return " ".join(text.split())


def required_text(record: dict, key: str, where: str, label: str | None = None) -> str:
    label = label or key
    if key not in record:
        raise UserError(f"{where}: missing field {label!r}")
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {label!r} must be a string, got {json_type(value)}")
    text = clean_text(value)
    if not text:
        raise UserError(f"{where}: field {label!r} is empty")
    return text


def optional_text(record: dict, key: str, where: str, label: str | None = None) -> str | None:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: field {label or key!r} must be a string, got {json_type(value)}")
    return clean_text(value)


def optional_id(record: dict, key: str, where: str) -> str | None:
    """Ids may be strings or integers (CounterFact's case_id is an integer); both become strings."""
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: field {key!r} must be a string or an integer, got {json_type(value)}")
    return str(value).strip()


def require_object(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {json_type(record)}")
    return record


# ------------------------------------------------------------------------------------------ building examples


def record_kind(record: object) -> str:
    """'counterfact', 'counterfact-flat' or 'task', from the keys a record has."""
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if "edit_fact" not in record and "target_new" in record:
            return "counterfact-flat"
    return "task"


def task_example(record: object, where: str) -> dict:
    record = require_object(record, where)
    example = {
        "id": optional_id(record, "id", where),
        "subject": required_text(record, "subject", where),
        "edit_fact": required_text(record, "edit_fact", where),
    }
    for key in OPTIONAL_TEXT_FIELDS:
        value = optional_text(record, key, where)
        if value is not None:
            example[key] = value
    return example


def fact_sentence(stem: str, target: str) -> str:
    """'The mother tongue of X is' + 'English' -> 'The mother tongue of X is English.' (one space, one period)."""
    sentence = clean_text(f"{stem} {target}")
    sentence = re.sub(r"\s+([.!?])$", r"\1", sentence)
    sentence = re.sub(r"\.{2,}$", ".", sentence)
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def target_text(fields: dict, key: str, where: str, label: str, required: bool) -> str | None:
    """CounterFact targets are {"str": "English", "id": "Q1860"}; flat inputs may give the string itself."""
    value = fields.get(key)
    if isinstance(value, dict):
        return required_text(value, "str", where, f"{label}.str")
    if required:
        return required_text(fields, key, where, label)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: field {label!r} must be a string or an object with 'str', got {json_type(value)}")
    return optional_text(fields, key, where, label)


def edit_from_template(fields: dict, where: str, prefix: str, example_id: str | None) -> dict:
    subject = required_text(fields, "subject", where, f"{prefix}subject")
    template = required_text(fields, "prompt", where, f"{prefix}prompt")
    if "{}" not in template:
        raise UserError(f"{where}: {prefix}prompt has no '{{}}' placeholder")
    # replace, not str.format: a stray brace elsewhere in the template would make format() raise
    stem = template.replace("{}", subject)
    new_target = target_text(fields, "target_new", where, f"{prefix}target_new", required=True)
    true_target = target_text(fields, "target_true", where, f"{prefix}target_true", required=False)
    example = {"id": example_id, "subject": subject, "edit_fact": fact_sentence(stem, new_target)}
    if true_target is not None:
        example["true_fact"] = fact_sentence(stem, true_target)
    return example


def counterfact_id(record: dict, where: str) -> str | None:
    case_id = optional_id(record, "case_id", where)
    return case_id if case_id is not None else optional_id(record, "id", where)


def counterfact_example(record: object, where: str) -> dict:
    record = require_object(record, where)
    if "requested_rewrite" not in record:
        raise UserError(f"{where}: missing field 'requested_rewrite'")
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, dict):
        raise UserError(f"{where}: field 'requested_rewrite' must be an object, got {json_type(rewrite)}")
    return edit_from_template(rewrite, where, "requested_rewrite.", counterfact_id(record, where))


def flat_counterfact_example(record: object, where: str) -> dict:
    record = require_object(record, where)
    return edit_from_template(record, where, "", counterfact_id(record, where))


BUILDERS = {"counterfact": counterfact_example, "counterfact-flat": flat_counterfact_example, "task": task_example}


def assign_ids(path: str, located_examples: list[tuple[str, dict]]) -> list[dict]:
    """Fill in missing ids with the record's position and reject duplicates, naming both places."""
    if not located_examples:
        raise UserError(f"{path}: no examples")
    first_seen: dict[str, str] = {}
    examples = []
    for position, (location, example) in enumerate(located_examples, start=1):
        if example["id"] is None:
            example["id"] = str(position)
        if example["id"] in first_seen:
            raise UserError(f"{path} {location}: duplicate id {example['id']!r} (also {first_seen[example['id']]})")
        first_seen[example["id"]] = location
        examples.append(example)
    return examples


def convert(input_path: str) -> list[dict]:
    """Read CounterFact (nested or flat) or task-format records from .json/.jsonl/.csv; return task examples.
    Raises UserError naming the file, the line or record, and the field."""
    records = read_records(input_path)
    build = BUILDERS[record_kind(records[0][1])] if records else task_example
    return assign_ids(
        input_path, [(location, build(record, f"{input_path} {location}")) for location, record in records]
    )


def load_examples(path: str) -> list[dict]:
    """Read a dataset in the task format (.jsonl, or .json / .csv holding the same fields), validated as by
    convert(). Each example has id, subject, edit_fact and maybe true_fact, prompt."""
    located_examples = []
    for location, record in read_records(path):
        where = f"{path} {location}"
        if record_kind(record) != "task":
            raise UserError(
                f"{where}: a CounterFact record, not the task format: "
                f"convert the file first with python convert_data.py"
            )
        located_examples.append((location, task_example(record, where)))
    return assign_ids(path, located_examples)


# ------------------------------------------------------------------------------------------------- writing


def write_jsonl_atomically(path: str, examples: list[dict]) -> None:
    """A crash leaves the old file or the new one, never half of one."""
    text = "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="CounterFact-style .json/.jsonl, or task-format .jsonl/.csv")
    parser.add_argument("output", help="task-format .jsonl to write (replaced atomically)")
    parser.add_argument(
        "--limit", type=int, default=None, help="write only the first N examples (the whole input is still validated)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit must be at least 1, got {args.limit}")
        if not args.output.endswith(".jsonl"):
            raise UserError(f"output must be a .jsonl file: {args.output}")
        examples = convert(args.input)[: args.limit]
        try:
            write_jsonl_atomically(args.output, examples)
        except OSError as exc:
            raise UserError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        print(f"wrote {len(examples)} example{'' if len(examples) == 1 else 's'} to {args.output}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
