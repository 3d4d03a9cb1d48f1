"""Text tokenizer: SentencePiece trained on the world's own text, with fixed special ids.

Every part of omnifuse relies on these ids, so they are pinned at training time:

====  ==========  ==========================================================
 id   piece       role
====  ==========  ==========================================================
 0    ``<pad>``   padding; also the token id of every media patch slot
 1    ``<unk>``   unknown piece
 2    ``<s>``     BOS, first slot of a document
 3    ``</s>``    EOS, last slot of a document (a target after an answer)
 4    ``<img>``   opens an image block
 5    ``</img>``  closes an image block
 6    ``<aud>``   opens an audio block
 7    ``</aud>``  closes an audio block
 8    ``<row>``   ends one row of patches (image rows, spectrogram frequency bands)
====  ==========  ==========================================================

The five structural symbols are SentencePiece *control* symbols: ``encode("<img>")`` segments the
characters ``< i m g >`` like any other text and never yields id 4, so a caption or a question
cannot forge a media boundary. ``decode`` drops every special id except ``<unk>``.

CLI (the world generator runs it after writing the train split)::

    python -m omnifuse.tokenizers.text train --data worlds/tiny --vocab-size 768 --out worlds/tiny/tokenizer.model
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
IMG_ID, IMG_END_ID, AUD_ID, AUD_END_ID, ROW_ID = 4, 5, 6, 7, 8
CONTROL_SYMBOLS = ("<img>", "</img>", "<aud>", "</aud>", "<row>")  # ids 4..8, in this order
NUM_SPECIAL = 9  # ids below this are special; the first learned piece has id 9
SPECIAL_IDS = frozenset(range(NUM_SPECIAL))
ASCII_CHARS = "".join(chr(c) for c in range(33, 127))  # printable ASCII; space is SentencePiece's "▁"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out: Path | str,
    *,
    model_type: str = "bpe",
    seed: int = 0,
) -> Path:
    """Train a SentencePiece model on ``texts`` and write it to ``out`` (``*.model``).

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a small corpus yields a
    smaller vocabulary instead of an error. Training is in memory (no temporary files),
    single-threaded and seeded, so the same texts in the same order give the same file.
    Empty strings are skipped. Returns ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sentences = [t for t in texts if t and t.strip()]
    if not sentences:
        raise ValueError("train_tokenizer got no non-empty text")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        hard_vocab_limit=False,
        character_coverage=1.0,
        required_chars=ASCII_CHARS,  # any printable ASCII round-trips, even if the corpus lacks it
        byte_fallback=False,
        normalization_rule_name="identity",  # the world's text is ASCII; keep round trips exact
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        control_symbols=list(CONTROL_SYMBOLS),
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return out


class TextTokenizer:
    """A trained SentencePiece model with omnifuse's fixed special ids (module docstring)."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    img_id = IMG_ID
    img_end_id = IMG_END_ID
    aud_id = AUD_ID
    aud_end_id = AUD_END_ID
    row_id = ROW_ID

    def __init__(self, model_path: Path | str):
        self.model_path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self._check_specials()

    def _check_specials(self) -> None:
        expected = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
        expected.update({IMG_ID + i: s for i, s in enumerate(CONTROL_SYMBOLS)})
        got = {i: self.sp.id_to_piece(i) for i in expected} if self.sp.get_piece_size() > NUM_SPECIAL else {}
        if got != expected:
            raise ValueError(
                f"{self.model_path} does not have omnifuse's special ids {expected} (got {got}); "
                "train it with omnifuse.tokenizers.text.train_tokenizer"
            )

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the model's embedding/output size)."""
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without BOS/EOS. Special symbols in ``text`` are ordinary characters."""
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping pad/BOS/EOS and the structural symbols (``<unk>`` is kept)."""
        return self.sp.decode([int(i) for i in ids if int(i) == UNK_ID or int(i) not in SPECIAL_IDS])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"TextTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def iter_world_texts(data_dir: Path | str, split: str = "train") -> Iterator[str]:
    """Every text segment of every sample in ``data_dir/split/*.tar`` (shards in name order).

    Reads the ``KEY.json`` members only; media members are skipped without being decoded.
    """
    shards = sorted(Path(data_dir, split).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards in {Path(data_dir, split)}/*.tar")
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".json")):
                    continue
                try:
                    sample = json.loads(tar.extractfile(member).read())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{shard}: {member.name} is not valid JSON: {e}") from e
                for seg in sample.get("segments", ()):
                    if "text" in seg:
                        yield seg["text"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m omnifuse.tokenizers.text",
        description="Train omnifuse's SentencePiece tokenizer on a world's text segments.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train on DIR/<split>/*.tar text segments")
    tr.add_argument("--data", type=Path, required=True, help="world folder holding <split>/*.tar shards")
    tr.add_argument("--split", default="train", help="split folder to read (default: train)")
    tr.add_argument("--vocab-size", type=int, default=768, help="upper bound on the vocabulary (default: 768)")
    tr.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tr.add_argument("--out", type=Path, required=True, help="output .model file")
    args = parser.parse_args(argv)

    out = train_tokenizer(iter_world_texts(args.data, args.split), args.vocab_size, args.out, model_type=args.model_type)
    tok = TextTokenizer(out)
    print(f"wrote {out} (vocab_size={tok.vocab_size})")


if __name__ == "__main__":
    main()
