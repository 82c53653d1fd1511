"""Progress lines of long loops: every 10%, and the final line exactly once."""

import logging

from domaintune.progress import Progress


def test_lines_every_tenth_and_final_once(caplog):
    logger = logging.getLogger("test_progress")
    with caplog.at_level(logging.INFO, logger="test_progress"):
        progress = Progress(20, "evaluate: base model generates", "answers", logger=logger)
        for _ in range(10):
            progress.advance(2, tokens=7)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10, lines
    assert lines[-1].startswith(
        "evaluate: base model generates: 20 of 20 answers (100%), 70 tokens"
    )
    assert sum("20 of 20" in line for line in lines) == 1


def test_final_line_when_the_last_batch_was_not_logged(caplog):
    logger = logging.getLogger("test_progress")
    with caplog.at_level(logging.INFO, logger="test_progress"):
        progress = Progress(0, "predict", logger=logger)  # unknown total: logs at once
        progress.close()
        progress = Progress(1000, "predict", logger=logger)
        progress.advance(150)  # 15%: one line
        progress.advance(10)  # 16%: none
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-2:] == [lines[-2], lines[-1]]
    assert "150 of 1000" in lines[-2] and "160 of 1000" in lines[-1]
