"""kvdistill.train"""
