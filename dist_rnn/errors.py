"""Errors that the command line reports as one line with exit code 2."""


class UserError(Exception):
    """Bad input from the user: config, data, checkpoint or command-line argument.

    The CLI prints ``error: <message>`` on one line and exits with code 2, with no
    traceback. The message says what is wrong and where (key, file, argument).
    """

    exit_code = 2
