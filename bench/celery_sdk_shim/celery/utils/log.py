import logging


def get_task_logger(name):
    return logging.getLogger(name)
