"""Errors that the command line reports as one line with exit code 2, and their one-line wording."""


class UserError(Exception):
    """Bad input from the user: config, data, checkpoint or command-line argument.

    The CLI prints ``error: <message>`` on one line and exits with code 2, with no
    traceback. The message says what is wrong and where (key, file, argument).
    """

    exit_code = 2


# Exit code of a worker whose collective failed because a peer worker or rank
# was lost (EX_TEMPFAIL of sysexits.h): the failure a restart can fix, told
# apart by the launcher (dist_rnn.supervisor) from exit 2 (bad input) and 1.
LOST_PEER_EXIT_CODE = 75


def first_line(error: BaseException | str, limit: int | None = 300) -> str:
    """The first line of an exception's message, for quoting a library's error in a one-line message.

    Args:
        error: The exception (or its message).
        limit: At most this many characters are kept (None: the whole line).

    Returns:
        The first line of the stripped message, or the exception's class
        name if the message is empty.
    """
    text = str(error).strip()
    if not text:
        text = error.__class__.__name__ if isinstance(error, BaseException) else ""
    line = text.splitlines()[0] if text else ""
    return line if limit is None else line[:limit]
