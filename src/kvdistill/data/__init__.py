"""kvdistill.data"""
