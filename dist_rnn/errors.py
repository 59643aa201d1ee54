"""Errors that the command line reports as one line with exit code 2."""


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
