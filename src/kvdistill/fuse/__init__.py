"""kvdistill.fuse"""
